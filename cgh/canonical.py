"""The canonical backbone checkpoint: what pretraining exports and every protocol consumes.

``NAME.safetensors`` holds the backbone in torchvision ResNet key names (no ``fc``); the sidecar
``NAME.json`` says what it is (architecture, method, epoch, training config, the sha256 of the
training checkpoint it came from). safetensors holds tensors only, so reading it runs no code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cgh.backbone import infer_arch
from cgh.errors import CghError
from cgh.io import atomic_path, atomic_write_json, sha256_file

FORMAT = "cgh-canonical"
FORMAT_VERSION = 1


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_canonical(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *, method: str,
                   arch: str | None = None, source_sha256: str | None = None,
                   train_config: dict | None = None, epoch: int | None = None,
                   extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar atomically; return the tensor file path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"canonical checkpoints end in .safetensors, got {path}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()
               if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    detected = infer_arch(tensors)
    if arch is not None and arch != detected:
        raise CghError(f"weights describe {detected}, not {arch}")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "arch": detected, "method": method})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": detected,
        "method": method,
        "epoch": epoch,
        "source_sha256": source_sha256,
        "sha256": sha256_file(path),
        "num_tensors": len(tensors),
        "train_config": train_config,
    }
    if extra:
        meta.update(extra)
    atomic_write_json(sidecar_path(path), meta)
    return path


def load_canonical(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a canonical checkpoint; the sidecar is optional (its absence gives minimal metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CghError(f"{path}: not a readable safetensors file ({e})") from None
    side = sidecar_path(path)
    meta = json.loads(side.read_text()) if side.is_file() else {"format": FORMAT}
    meta.setdefault("arch", infer_arch(tensors))
    meta.setdefault("method", "unknown")
    return tensors, meta
