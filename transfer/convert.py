"""Write a torchvision-named backbone in the layout another toolkit expects, and read detectron2's back.

Every writer takes the backbone exactly as ``transfer.hub.load_backbone`` returns it (torchvision
keys, no ``fc``) and stores the tensors unchanged, so a conversion is bit-exact.

- ``canonical``: this project's safetensors + JSON sidecar (``cgh.canonical``).
- ``torchvision``: a plain ``{key: tensor}`` ``.pth`` that ``resnetXX().load_state_dict(sd,
  strict=False)`` loads with only ``fc.*`` missing.
- ``detectron2``: the MoCo conversion (``../shared/PROTOCOLS.md``) as a ``.pkl`` of numpy arrays with
  ``__author__`` (detectron2 reads a .pkl as its own names only then) and ``matching_heuristics``
  (so ``res5`` finds its home in the R50-C4 ROI head).
- ``mmseg``: ``{"state_dict": ..., "meta": ...}`` in the names of mmseg/mmpretrain's ``ResNet``
  (which equal torchvision's), for ``init_cfg=dict(type="Pretrained", checkpoint=...)``. mmseg's
  ``ResNetV1c`` has a deep stem (three 3x3 convs, ``stem.*``) that a torchvision ResNet does not
  have, so these weights cannot fill it: the segmentation protocol uses ``ResNet`` (as mmselfsup's
  benchmark does).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from cgh.canonical import save_canonical
from cgh.errors import CghError
from cgh.io import atomic_path

FORMATS = ("canonical", "torchvision", "detectron2", "mmseg")
DETECTRON2_AUTHOR = "cgh (MoCo conversion rules)"


class ConvertError(CghError):
    """A conversion target or output path that cannot be written."""


def _backbone_only(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


# ---- detectron2 ------------------------------------------------------------------------------------

def to_detectron2_name(key: str) -> str:
    """torchvision -> detectron2 ResNet name, by MoCo's rules (``layer1`` -> ``res2``, ``bn1`` ->
    ``conv1.norm``, ``downsample.0/1`` -> ``shortcut(.norm)``, stem keys get ``stem.``)."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


def from_detectron2_name(key: str) -> str:
    """detectron2 -> torchvision ResNet name: the exact inverse of ``to_detectron2_name``."""
    key = re.sub(r"^stem\.", "", key)
    key = re.sub(r"^res([2-5])\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)
    key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    return re.sub(r"conv([1-3])\.norm", r"bn\1", key)


def to_detectron2_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_detectron2_name(k): v for k, v in _backbone_only(state_dict).items()}


def from_detectron2_names(model: dict) -> dict:
    """torchvision names for a detectron2 backbone dict; ``backbone.``/``roi_heads.`` prefixes of a
    trained detectron2 model are dropped first (R50-C4 keeps ``res5`` in its ROI head)."""
    out = {}
    for k, v in model.items():
        k = re.sub(r"^(backbone\.(bottom_up\.)?|roi_heads\.)", "", k)
        out[from_detectron2_name(k)] = v
    return out


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()   # numpy has no bfloat16; widening to float32 is exact
    return t.numpy().copy()


def save_detectron2(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                    author: str = DETECTRON2_AUTHOR) -> Path:
    """Write the detectron2 ``.pkl`` that ``DetectionCheckpointer`` loads as MoCo's converter would."""
    path = Path(path)
    if path.suffix != ".pkl":
        raise ConvertError(f"detectron2 checkpoints must end in .pkl (detectron2 reads other "
                           f"suffixes as its own .pth format), got {path}")
    model = {k: _to_numpy(v) for k, v in to_detectron2_names(state_dict).items()}
    payload = {"model": model, "__author__": author, "matching_heuristics": True}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=4)
    return path


# ---- torchvision / mmseg ---------------------------------------------------------------------------

def _torch_save(obj, path: Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def save_torchvision(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """A plain state dict in torchvision names; ``fc`` is absent (the classifier is not pretrained)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in _backbone_only(state_dict).items()}
    return _torch_save(sd, Path(path))


def save_mmseg(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
               meta: dict | None = None) -> Path:
    """An mmengine-style checkpoint for mmseg/mmpretrain ``ResNet`` backbones (``init_cfg`` Pretrained).

    mmengine reads ``checkpoint["state_dict"]`` and loads it into the backbone module itself, whose
    ``ResNet`` names equal torchvision's. ``meta`` holds plain values only, so the file loads with
    ``torch.load(weights_only=True)``.
    """
    sd = {k: v.detach().cpu().contiguous() for k, v in _backbone_only(state_dict).items()}
    return _torch_save({"state_dict": sd, "meta": dict(meta or {})}, Path(path))


# ---- one entry point -------------------------------------------------------------------------------

def write_checkpoint(ck, fmt: str, out: str | os.PathLike) -> Path:
    """Write a ``transfer.hub.LoadedCheckpoint`` as ``fmt`` to ``out``; return the written path."""
    out = Path(out)
    if fmt == "canonical":
        if out.suffix != ".safetensors":
            raise ConvertError(f"canonical checkpoints end in .safetensors, got {out}")
        return save_canonical(ck.state_dict, out, method=ck.method, arch=ck.arch,
                              source_sha256=ck.sha256, train_config=ck.train_config, epoch=ck.epoch,
                              extra={"source_path": str(ck.path), "source_layout": ck.layout,
                                     "method_source": ck.method_source})
    if fmt == "torchvision":
        return save_torchvision(ck.state_dict, out)
    if fmt == "detectron2":
        return save_detectron2(ck.state_dict, out)
    if fmt == "mmseg":
        return save_mmseg(ck.state_dict, out, meta={
            "arch": ck.arch, "method": ck.method, "method_source": ck.method_source, "source_sha256": ck.sha256,
            "source_layout": ck.layout, "epoch": ck.epoch})
    raise ConvertError(f"unknown output format '{fmt}'; choose one of: {', '.join(FORMATS)}")


def convert_checkpoint(src: str | os.PathLike, fmt: str, out: str | os.PathLike, *, from_fmt: str | None = None,
                       key: str | None = None, prefix: str | None = None):
    """Read ``src`` (any layout), write it as ``fmt``, read the result back and check that every
    tensor is bit-identical to the source; returns (LoadedCheckpoint of the source, written path)."""
    from transfer.hub import load_backbone   # hub's layout table uses this module's renaming

    if fmt not in FORMATS:
        raise ConvertError(f"unknown output format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    ck = load_backbone(src, fmt=from_fmt, key=key, prefix=prefix)
    written = write_checkpoint(ck, fmt, out)
    back = load_backbone(written, fmt=fmt)
    # detectron2 stores float32 numpy arrays: a float16/bfloat16 source is widened, exactly
    differ = sorted(k for k in ck.state_dict if k not in back.state_dict
                    or not torch.equal(back.state_dict[k].to(ck.state_dict[k].dtype), ck.state_dict[k]))
    if differ or set(back.state_dict) != set(ck.state_dict):
        raise ConvertError(f"{written}: read-back differs from the source in {len(differ)} tensors "
                           f"(e.g. {', '.join(differ[:3])})")
    return ck, written
