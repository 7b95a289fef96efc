"""Placeholder for detectron2's C++ extension (``detectron2._C``) in the offline install.

The offline route installs detectron2 v0.6's pure-Python package without compiling its C++ ops.
Several modules import ``_C`` at import time, so this module must exist; any attempt to use one of
the missing ops (rotated boxes, deformable convolution, the fast COCO evaluator) fails loudly here.
ROIAlign and NMS come from torchvision, so Faster/Mask R-CNN R50-C4 work fully without it.
"""


def __getattr__(name):
    raise NotImplementedError(
        f"detectron2._C.{name} is a compiled op that the offline detectron2 install lacks. "
        "Install detectron2 from its official source (set CGH_DETECTRON2_SOURCE and re-run "
        "`make install`) to use it."
    )
