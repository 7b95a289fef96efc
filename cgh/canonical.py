"""The canonical backbone checkpoint: what pretraining exports and every protocol consumes.

``NAME.safetensors`` holds the backbone in torchvision ResNet key names (no ``fc``); the sidecar
``NAME.json`` says what it is (architecture, method, epoch, training config, the sha256 of the
training checkpoint it came from, and the sha256 of ``NAME.safetensors`` itself). safetensors holds
tensors only, so reading it runs no code.

The pair is written tensors first, sidecar second: a crash in between leaves new tensors beside the
old sidecar, so a reader checks the sidecar's ``sha256`` against the tensor file and refuses a pair
that does not match. The sidecar is read as inert, bounded JSON (``cgh.inert``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cgh.backbone import infer_arch
from cgh.errors import CghError
from cgh.inert import check_summary, inert_copy
from cgh.io import atomic_path, atomic_write_json, read_json_file, sha256_file

FORMAT = "cgh-canonical"
FORMAT_VERSION = 1
SIDECAR_LIMIT = 1 << 20   # bytes; a real sidecar is about 1 KB


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


def read_sidecar(path: str | os.PathLike, sha256: str | None = None) -> dict | None:
    """The sidecar of tensor file ``path`` (None when there is none), checked to describe that very
    file: ``sha256`` is the file's hash when the caller has it already (else it is computed)."""
    path, side = Path(path), sidecar_path(path)
    if not os.path.lexists(side):
        return None
    meta = read_json_file(side, SIDECAR_LIMIT)
    if not isinstance(meta, dict):
        raise CghError(f"sidecar {side} is a JSON {type(meta).__name__}, not an object")
    try:
        meta = inert_copy(meta)
        if meta.get("train_config") is not None:
            meta["train_config"] = check_summary(meta["train_config"])
    except CghError as e:
        raise CghError(f"sidecar {side} {e}") from None
    for key, ok in (("method", lambda v: isinstance(v, str)),
                    ("epoch", lambda v: isinstance(v, int) and not isinstance(v, bool))):
        if meta.get(key) is not None and not ok(meta[key]):
            raise CghError(f"sidecar {side}: '{key}' is a {type(meta[key]).__name__}")
    recorded, actual = meta.get("sha256"), sha256 or sha256_file(path)
    if recorded != actual:
        raise CghError(f"sidecar {side} describes another tensor file (sha256 {str(recorded)[:16]}... vs "
                       f"{actual[:16]}...): the pair is inconsistent, re-export or delete the sidecar")
    return meta


def load_canonical(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a canonical checkpoint; the sidecar is optional (its absence gives minimal metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CghError(f"{path}: not a readable safetensors file ({e})") from None
    meta = read_sidecar(path) or {"format": FORMAT}
    meta.setdefault("arch", infer_arch(tensors))
    meta.setdefault("method", "unknown")
    return tensors, meta
