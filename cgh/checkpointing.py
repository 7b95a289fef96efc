"""Full training state on disk: save atomically, find the newest complete one, restore exactly.

A checkpoint holds everything an uninterrupted run would still have in memory: model (student,
teacher, queues and their pointer are parameters/buffers), optimizer, AMP scaler, the loop
position (epoch, global step), the log history and every RNG state (Python, NumPy, torch CPU and
CUDA, per rank). It is read with ``torch.load(weights_only=True)``, so it stores tensors and plain
containers only: RNG states are tensors, configs are dicts.

Files are ``checkpoints/epoch_0004.pt`` (rank 0's shared state) plus ``epoch_0004.rank1.pt`` ...
for the RNG state of other ranks. Every file is written to a temporary name and renamed, and the
rank-0 file is written last, so its presence means the checkpoint is complete.
"""
from __future__ import annotations

import random
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from cgh.errors import CghError
from cgh.io import atomic_path

_NAME = re.compile(r"^epoch_(\d{4,})\.pt$")


class CheckpointStateError(CghError):
    """A training checkpoint is missing, unreadable, or does not belong to this run."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, epoch: int, rank: int = 0) -> Path:
    suffix = ".pt" if rank == 0 else f".rank{rank}.pt"
    return checkpoint_dir(output_dir) / f"epoch_{epoch:04d}{suffix}"


def rng_state() -> dict:
    """Every RNG this process draws from, as tensors and plain values (weights_only-safe)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(output_dir: str | Path, epoch: int, state: dict, rank: int = 0,
                    world_size: int = 1, keep_last: int = 0) -> Path | None:
    """Write this rank's part of the checkpoint of ``epoch``; rank 0 also writes the shared state.

    Ranks > 0 write their RNG state only; the caller puts a barrier between the ranks' writes and
    rank 0's, so the rank-0 file (the completeness marker) appears last. ``keep_last`` > 0 prunes
    older checkpoints once the new one is complete.
    """
    rank_state = {"rng": rng_state(), "epoch": epoch, "rank": rank}
    if rank != 0:
        _save(rank_state, checkpoint_path(output_dir, epoch, rank))
        return None
    path = checkpoint_path(output_dir, epoch)
    _save({**state, **rank_state, "world_size": world_size}, path)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            for f in checkpoint_dir(output_dir).glob(f"{old.stem}.*"):
                f.unlink(missing_ok=True)
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (rank-0 files), oldest first."""
    d = checkpoint_dir(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path, rank: int = 0) -> dict:
    """Read a checkpoint safely (no pickle code runs); for rank > 0 merge in that rank's RNG state."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointStateError(f"{path}: not a readable training checkpoint ({e})") from None
    if rank != 0:
        rpath = path.with_name(f"{path.stem}.rank{rank}.pt")
        try:
            state["rng"] = torch.load(rpath, map_location="cpu", weights_only=True)["rng"]
        except Exception as e:
            raise CheckpointStateError(f"{rpath}: RNG state of rank {rank} missing or unreadable ({e})") from None
    return state


def find_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """``resume``: None/"" -> start fresh; "auto" -> the newest complete checkpoint that loads
    (older ones are tried if the newest is damaged), or None when there is none; else a path."""
    if not resume:
        return None
    if resume != "auto":
        p = Path(resume)
        if not p.is_file():
            raise CheckpointStateError(f"resume checkpoint not found: {p}")
        return p
    for p in reversed(list_checkpoints(output_dir)):
        try:  # torch.save writes a zip archive: check every member's CRC without unpickling
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
            if bad is None:
                return p
            warnings.warn(f"skipping damaged checkpoint {p} (member {bad})")
        except (OSError, zipfile.BadZipFile) as e:
            warnings.warn(f"skipping unreadable checkpoint {p}: {e}")
    return None
