"""A run folder belongs to one run: (protocol, checkpoint sha256, resolved config), and one process.

Why: a protocol resumes from, or reuses, what it finds in its output folder. Pointed at a folder that
holds another run (another checkpoint, another protocol, other settings) it would report the old
run's numbers under the new checkpoint's name, or mix two runs' logs. So every run first *claims* its
folder:

- ``cgh_run.json`` (written atomically when the folder is first claimed) names the run's identity.
  A folder bound to another identity, or holding files no run claimed, is refused with one line
  naming both; with ``overwrite`` it is moved aside (``NAME.replaced-<time>``) and the run starts
  fresh in an empty folder. Launch settings that do not change the numbers (``LAUNCH_KEYS``: where
  the output goes, resuming, the number of seeds, the loader workers, ...) are not part of it.
- ``.cgh.lock`` (an ``flock``) is held for the whole run: a second process into the same folder is
  refused instead of overwriting the first one's record.
- temporary files of writes killed half-way (``cgh.io.atomic_path``'s ``.NAME.*.tmp``) are deleted.
- a folder the claim created is deleted again when the run fails on bad input (a ``CghError``)
  before it saved anything to resume from (``RESUMABLE``): no junk folders from a typo.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cgh.errors import CghError
from cgh.io import atomic_write_json, read_json_file
from cgh.records import display_text

RUN_FILE = "cgh_run.json"
LOCK_FILE = ".cgh.lock"
RUN_FILE_VERSION = 1
# Config keys that say how or where a run is launched, not what it computes: a run resumed with
# other values of these is the same run. (``checkpoint`` is a path: the identity holds its sha256.)
LAUNCH_KEYS = frozenset({"checkpoint", "output_dir", "resume", "overwrite", "seeds", "num_workers",
                         "machine_rank", "dist_url", "cache_dir"})
# What a failed run may have saved to resume from (anywhere below its folder): pretraining's
# checkpoints, the probes' states, the detectron2/mmseg checkpoint manifests.
RESUMABLE = ("checkpoints", "linear_state.pt", "semi_state.pt", "cgh_checkpoints.json")


class RunFolderError(CghError):
    """The output folder belongs to another run, or another process is using it."""


def _settings(config):
    """The config without ``LAUNCH_KEYS`` (at any depth)."""
    if isinstance(config, dict):
        return {k: _settings(v) for k, v in config.items() if k not in LAUNCH_KEYS}
    if isinstance(config, (list, tuple)):
        return [_settings(v) for v in config]
    return config


def run_identity(protocol: str, checkpoint_sha256: str | None, config: dict) -> dict:
    """What a run folder is bound to: the protocol, the checkpoint's content, the settings' hash."""
    text = json.dumps(_settings(config), sort_keys=True, default=str, allow_nan=True)
    return {"protocol": protocol, "checkpoint_sha256": checkpoint_sha256,
            "config_sha256": hashlib.sha256(text.encode()).hexdigest()}


def describe(identity: dict) -> str:
    """One line for messages; the values may come from a planted file, so they are made display-safe."""
    sha = identity.get("checkpoint_sha256")
    of = f" of checkpoint {display_text(str(sha)[:12])}" if sha else ""
    return (f"a {display_text(identity.get('protocol'), 40)} run{of} "
            f"(settings {display_text(str(identity.get('config_sha256'))[:8])})")


@contextmanager
def claimed_run_folder(out_dir: str | os.PathLike, identity: dict, *, overwrite: bool = False,
                       main: bool = True, fresh_if: tuple[str, ...] = ()) -> Iterator[Path]:
    """Claim ``out_dir`` for the run ``identity`` (see the module docstring) for the ``with`` block.

    ``main``: only the main process of a multi-process run claims; the others just get the path.
    ``fresh_if``: names of files or folders whose presence in a folder of the *same* run is refused
    unless ``overwrite`` (e.g. pretraining's ``checkpoints`` when it was not asked to resume: starting
    over next to old checkpoints would let a later resume mix two runs).
    """
    out = Path(out_dir)
    if not main:
        yield out
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        problem = _conflict(out, identity, fresh_if)
        if problem and not overwrite:
            raise RunFolderError(f"{out} {problem}: use another output folder, or --overwrite "
                                 "(overwrite=true) to move the old run aside and start fresh")
        if problem:
            aside = _move_aside(out)
            _unlock(lock)
            out.mkdir(parents=True)
            lock = _lock(out)
            print(f"[cgh] moved the earlier run in {out} aside to {aside}")
        remove_orphan_temporaries(out)
        atomic_write_json(out / RUN_FILE, {"version": RUN_FILE_VERSION, **identity,
                                           "claimed": _dt.datetime.now(_dt.timezone.utc).isoformat(
                                               timespec="seconds")})
        try:
            yield out
        except CghError:
            if created and not any(next(out.rglob(name), None) for name in RESUMABLE):
                shutil.rmtree(out, ignore_errors=True)
            raise
    finally:
        _unlock(lock)


def _conflict(out: Path, identity: dict, fresh_if: tuple[str, ...]) -> str | None:
    """Why ``out`` cannot host the run ``identity`` as it is (None: it can)."""
    run_file = out / RUN_FILE
    if not run_file.exists():
        others = sorted(display_text(p.name, 60) for p in out.iterdir() if p.name != LOCK_FILE)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            return f"holds files that no cgh run claims ({shown})"
        return None
    try:
        bound = read_json_file(run_file, limit=64 * 1024)
    except CghError as e:
        return f"has an unreadable {RUN_FILE} ({e})"
    if not isinstance(bound, dict):
        return f"has an unreadable {RUN_FILE} (not a JSON object)"
    keys = ("protocol", "checkpoint_sha256", "config_sha256")
    if any(bound.get(k) != identity[k] for k in keys):
        differs = [k.replace("_sha256", "") for k in keys if bound.get(k) != identity[k]]
        return (f"belongs to {describe(bound)}, not to this {describe(identity)[2:]} "
                f"(they differ in: {', '.join(differs)})")
    present = [name for name in fresh_if if (out / name).exists()]
    if present:
        return f"already holds this run's {', '.join(present)} and the run was not asked to resume"
    return None


def _move_aside(out: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        aside, n = out.with_name(f"{out.name}.replaced-{stamp}-{n}"), n + 1
    os.replace(out, aside)
    return aside


def _lock(out: Path) -> int:
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"{out} is in use by another cgh process (lock {out / LOCK_FILE}); "
                                 "wait for it to finish or use another output folder") from None
        raise
    return fd


def folder_in_use(out: str | os.PathLike) -> bool:
    """True while a cgh process holds ``out``'s lock (a run is going on there), without taking it."""
    try:
        fd = os.open(Path(out) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def _unlock(fd: int) -> None:
    try:
        os.close(fd)          # closing the descriptor releases the flock
    except OSError:
        pass


def remove_orphan_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``cgh.io.atomic_path`` temporaries (``.NAME.XXXX.tmp``) left under ``folder`` by killed
    writes; only call this while holding the folder's lock (a live writer's file would go too)."""
    removed = []
    for path in Path(folder).rglob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
