"""Import detectron2 v0.6 under today's Pillow and numpy; one place for the shims and the error.

detectron2 v0.6 uses ``PIL.Image.LINEAR`` as a default argument at import time (removed in
Pillow 10, where it is called ``BILINEAR``) and ``np.bool`` / ``np.int`` in its PASCAL VOC and
semantic-segmentation evaluators (removed in numpy 2, where they meant the builtins). Both aliases
are set before detectron2 is imported; they only add names that no longer exist.
"""
from __future__ import annotations

import importlib

from cgh.errors import CghError


class Detectron2MissingError(CghError):
    """detectron2 is not installed in this environment."""


def _apply_shims() -> None:
    import numpy as np
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
    for name, builtin in (("bool", bool), ("int", int), ("float", float), ("str", str), ("object", object)):
        if name not in np.__dict__:
            setattr(np, name, builtin)


def import_detectron2():
    """Return the ``detectron2`` package, importable with the shims above in place."""
    _apply_shims()
    try:
        return importlib.import_module("detectron2")
    except ImportError as e:
        raise Detectron2MissingError(
            f"detectron2 is not installed ({e}); run `make install` (see README: detectron2 is "
            "installed from its official source or, offline, from PyPI's pb1-detectron2 sdist)"
        ) from None
