"""Which checkpoints in a run folder the run itself wrote: the only files a resume may read.

Anyone who can write to a run folder can plant a file there. detectron2's and mmengine's own resume
read ``last_checkpoint``, which may name any file, absolute path or URL, and unpickle it (a ``.pkl``
with plain ``pickle``; an mmengine checkpoint's ``meta['config']`` is even executed as Python). So
both toolkits here ignore ``last_checkpoint``: right after every save the run records the file's
sha256 in ``cgh_checkpoints.json`` next to it, a resume takes the newest recorded file whose bytes
still match (others are skipped with a warning), and the bytes are read once, checked, and given to
``torch.load(weights_only=True)``, so nothing in them can run.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
from pathlib import Path

from cgh.errors import CghError
from cgh.io import atomic_write_json, read_json_file

log = logging.getLogger(__name__)

MANIFEST = "cgh_checkpoints.json"
MANIFEST_LIMIT = 1 << 20                  # bytes; a few thousand entries
_NAME = re.compile(r"^[\w][\w.-]*$")      # a plain file name in the folder: no path, no URL
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ResumeError(CghError):
    """A recorded checkpoint cannot be resumed from (changed since it was verified, or unreadable)."""


def _entries(folder: Path) -> list[dict]:
    """The manifest's well-formed entries, oldest first; a missing or malformed manifest is empty."""
    path = folder / MANIFEST
    if not path.exists():
        return []
    try:
        data = read_json_file(path, MANIFEST_LIMIT)
    except CghError as e:
        log.warning("ignoring the checkpoint manifest: %s", e)
        return []
    items = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(items, list):
        log.warning("ignoring the checkpoint manifest %s: no 'checkpoints' list", path)
        return []
    good = [e for e in items if isinstance(e, dict) and isinstance(e.get("file"), str)
            and _NAME.match(e["file"]) and isinstance(e.get("sha256"), str) and _SHA256.match(e["sha256"])]
    if len(good) != len(items):
        log.warning("%s: ignoring %d malformed entries (a checkpoint is a file name in the folder and "
                    "its sha256)", path, len(items) - len(good))
    return good


def _open_regular(path: Path) -> int | None:
    """A read descriptor of ``path`` if it is a regular file (not a link, FIFO or device), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _digest(path: Path) -> str | None:
    fd = _open_regular(path)
    if fd is None:
        return None
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def record_checkpoint(path: str | os.PathLike) -> None:
    """Record the checkpoint the run has just written (main process, right after the save)."""
    path = Path(path)
    digest = _digest(path)
    if digest is None:
        raise ResumeError(f"{path}: the checkpoint just saved is not a regular file")
    folder = path.parent
    keep = [e for e in _entries(folder) if e["file"] != path.name and (folder / e["file"]).is_file()]
    atomic_write_json(folder / MANIFEST, {"checkpoints": keep + [{"file": path.name, "sha256": digest}]})


def latest_verified(folder: str | os.PathLike) -> Path | None:
    """The newest recorded checkpoint in ``folder`` whose bytes match the record, or None."""
    folder = Path(folder)
    for entry in reversed(_entries(folder)):
        path = folder / entry["file"]
        digest = _digest(path)
        if digest is None:
            log.warning("%s: skipped for resuming: recorded but missing (or not a regular file)", path)
        elif digest != entry["sha256"]:
            log.warning("%s: skipped for resuming: modified since the run wrote it (sha256 %s, "
                        "recorded %s)", path, digest[:12], entry["sha256"][:12])
        else:
            return path
    return None


def load_verified(path: str | os.PathLike, map_location="cpu"):
    """Load a recorded checkpoint: its bytes are read once, checked against the record, then given
    to ``torch.load(weights_only=True)`` (tensors and plain containers only)."""
    import torch

    path = Path(path)
    entry = next((e for e in _entries(path.parent) if e["file"] == path.name), None)
    if entry is None:
        raise ResumeError(f"{path}: not a checkpoint this run recorded in {MANIFEST}; refusing to load it")
    fd = _open_regular(path)
    if fd is None:
        raise ResumeError(f"{path}: recorded checkpoint is missing or not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ResumeError(f"{path}: modified since the run wrote it; refusing to load it")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:           # torch raises many kinds for a file it cannot or will not read
        line = str(e).strip().splitlines()
        raise ResumeError(f"{path}: cannot load the recorded checkpoint ({type(e).__name__}: "
                          f"{line[0][:200] if line else 'no detail'})") from None
