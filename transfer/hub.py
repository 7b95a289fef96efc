"""Read any ResNet checkpoint as torchvision backbone tensors: the single entry point for protocols.

Every protocol calls ``load_backbone(path)``; it detects the file's layout (ours, torchvision/timm,
MoCo, ReSSL, CGH release, DINO, SwAV, solo-learn, mmselfsup, VISSL, lightly, detectron2 .pkl),
extracts the backbone in torchvision key names and says what it ignored. Third-party files are
untrusted: nothing in them is executed.

NOTE: skeleton; the checkpoint-hub issue fills in the other layouts behind the same interface.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cgh.backbone import infer_arch
from cgh.canonical import load_canonical
from cgh.errors import CghError
from cgh.io import sha256_file


class CheckpointError(CghError):
    """A checkpoint cannot be read safely, has no recognisable backbone, or does not fit."""


@dataclass
class LoadedCheckpoint:
    """A backbone read from some checkpoint file, in torchvision names."""
    path: Path
    state_dict: dict[str, torch.Tensor]
    arch: str
    layout: str                      # detected or forced layout name, e.g. "canonical", "moco"
    sha256: str                      # of the file as given
    method: str = "unknown"          # from metadata where the file says, else the layout's method
    epoch: int | None = None
    train_config: dict | None = None  # pretraining config when the checkpoint carries one
    ignored: list[str] = field(default_factory=list)   # keys present but not part of the backbone

    @property
    def name(self) -> str:
        return self.path.stem

    def identity(self) -> dict:
        """The ``checkpoint`` block of a result record."""
        ident = {"path": str(self.path), "sha256": self.sha256, "method": self.method,
                 "arch": self.arch, "layout": self.layout, "name": self.name, "epoch": self.epoch}
        if self.train_config:
            ident["train"] = self.train_config
        return ident


def load_backbone(path: str | os.PathLike, fmt: str | None = None, key: str | None = None,
                  prefix: str | None = None) -> LoadedCheckpoint:
    """Read ``path`` and return its backbone; ``fmt`` forces a layout, ``key``/``prefix`` pick
    the sub-dict and key prefix by hand for layouts not known here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only canonical .safetensors checkpoints are supported so far")
    tensors, meta = load_canonical(path)
    return LoadedCheckpoint(path=path, state_dict=tensors, arch=infer_arch(tensors), layout="canonical",
                            sha256=sha256_file(path), method=meta.get("method", "unknown"),
                            epoch=meta.get("epoch"), train_config=meta.get("train_config"))
