"""Small file helpers shared by every stage: atomic writes and content hashes.

Every artefact a later stage reads (checkpoints, records, caches) is written to a temporary file in
the same folder and renamed into place, so a crash mid-write never leaves a half-written file under
the final name: readers see the old file or the new one, nothing in between.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cgh.errors import CghError

# errno values that mean "no room for this file": a full disk, a quota, a file-size limit (ulimit -f)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(CghError):
    """A file could not be written for lack of space; the previous version of it is intact."""


def disk_full_cause(err: BaseException) -> BaseException | None:
    """The disk-full ``OSError`` behind ``err`` (itself or a cause), or None.

    torch's zip writer reports a full disk as ``RuntimeError: ... unexpected pos`` without an errno;
    that message counts too.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err
        if isinstance(err, RuntimeError) and ("unexpected pos" in str(err) or "file write failed" in str(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if disk_full_cause(e) is not None and not isinstance(e, CghError):
            raise DiskFullError(f"no space left to write {path} ({_first_line(e)}); "
                                "the previous version of that file is unchanged") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json_file(path: str | os.PathLike, limit: int) -> Any:
    """Parse a JSON file that anyone could have put there, with bounded work.

    Only a regular file is read (a FIFO or device named like the file would hang or stream forever;
    it is opened non-blocking and checked before reading), at most ``limit`` bytes, and nesting too
    deep for the parser is an error, not a crash. Every problem is one ``CghError`` line.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CghError(f"{path}: cannot open ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CghError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise CghError(f"{path}: {info.st_size} bytes, more than the {limit} allowed")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CghError(f"{path}: more than the {limit} bytes allowed")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CghError(f"{path}: not valid JSON ({_first_line(e)})") from None
    except RecursionError:
        raise CghError(f"{path}: JSON nested too deeply") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
