"""The result record: one ``result.json`` per protocol run, the only thing ``reports/`` reads.

Schema (version ``SCHEMA_VERSION``)::

    schema_version: int
    protocol:   str   e.g. "knn", "linear", "linear_fast", "semi", "voc_det", "coco_instseg",
                      "seg", "pretrain"
    checkpoint: {path, sha256, method, arch, [epoch], [name]}
    dataset:    {name, root, split, [train_split]}
    metrics:    {name: number}          flat, e.g. {"top1": 71.2, "top5": 90.1}
    config:     dict                    the fully resolved config of the run
    environment:{python, torch, torchvision, device, packages:{}, git_commit, hostname}
    started, ended: ISO-8601 UTC;  wall_time_s: float
    extra:      dict (optional)         per-protocol details (per-k tables, per-class IoU, runs)

Records are untrusted input to reports (copied between machines, edited, truncated), so
``read_record`` reads only a regular file of at most ``MAX_RECORD_BYTES`` and ``validate_record``
bounds what a report computes with or draws: nesting depth ``MAX_DEPTH``, strings of at most
``MAX_STRING`` characters, numbers that fit a float, and metrics (also the per-seed values in
``extra.runs``) finite with ``|x| <= METRIC_BOUND`` (no accuracy, AP or loss comes near it; a
larger value is a corrupt record, not a result). ``write_record`` never writes what
``read_record`` would refuse, and never a bare ``NaN`` (invalid JSON for strict parsers).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
import platform
import re
import socket
import stat
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cgh.errors import CghError
from cgh.io import atomic_path, read_json_file

SCHEMA_VERSION = 1
RECORD_NAME = "result.json"
MAX_RECORD_BYTES = 16 * 1024 * 1024   # a real record is a few KB to a few hundred KB (histories)
MAX_DEPTH = 32                        # nested objects/lists; real records nest about 5 deep
MAX_STRING = 4096                     # characters in one string or key (PATH_MAX)
METRIC_BOUND = 1e9                    # |metric| above this is corruption, not a result
NAME_LIMIT = 80                       # characters of a name shown in a report (then an ellipsis)
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("torch", "torchvision", "numpy", "detectron2", "mmsegmentation", "mmcv", "mmengine",
             "scikit-learn", "pandas", "cgh")


class RecordError(CghError):
    """A result record does not follow the schema."""


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_PROJECT_ROOT), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str | None = None) -> dict:
    import torch

    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if device is None:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "packages": packages,
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
    }


_REQUIRED = {
    "schema_version": int, "protocol": str, "checkpoint": dict, "dataset": dict, "metrics": dict,
    "config": dict, "environment": dict, "started": str, "ended": str, "wall_time_s": (int, float),
}
_CHECKPOINT_KEYS = ("path", "sha256", "method", "arch")
_DATASET_KEYS = ("name", "split")


def validate_record(rec: Any) -> dict:
    """Raise ``RecordError`` naming the first problem; return the record unchanged."""
    if not isinstance(rec, dict):
        raise RecordError("record is not a JSON object")
    _check_tree(rec)
    for key, typ in _REQUIRED.items():
        if key not in rec:
            raise RecordError(f"record lacks '{key}'")
        if not isinstance(rec[key], typ) or isinstance(rec[key], bool):
            raise RecordError(f"record field '{key}' has type {type(rec[key]).__name__}")
    if not 1 <= rec["schema_version"] <= SCHEMA_VERSION:
        raise RecordError(f"record schema_version {rec['schema_version']} is not one this toolkit "
                          f"reads (1 to {SCHEMA_VERSION})")
    for key in _CHECKPOINT_KEYS:
        _check_type(rec["checkpoint"], key, "checkpoint", (str,), required=True)
    if not isinstance(rec["checkpoint"]["sha256"], str):     # reports key checkpoints by it
        raise RecordError("record field 'checkpoint.sha256' is not a string")
    _check_type(rec["checkpoint"], "name", "checkpoint", (str,))
    _check_type(rec["checkpoint"], "epoch", "checkpoint", (int, float))
    _check_type(rec["checkpoint"], "train", "checkpoint", (dict,))
    train = rec["checkpoint"].get("train") or {}
    for key, types in _TRAIN_TYPES.items():
        _check_type(train, key, "checkpoint.train", types)
    if isinstance(train.get("layers"), list) and not all(isinstance(x, (str, int)) for x in train["layers"]):
        raise RecordError("record field 'checkpoint.train.layers' holds something other than names")
    for key in _DATASET_KEYS:
        _check_type(rec["dataset"], key, "dataset", (str,), required=True)
    for name, value in rec["metrics"].items():
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RecordError(f"metric '{display_text(name)}' is not a number: {display_text(repr(value))}")
        _check_metric(f"metric '{display_text(name)}'", value)
    if "extra" in rec and not isinstance(rec["extra"], dict):
        raise RecordError("record field 'extra' is not an object")
    runs = (rec.get("extra") or {}).get("runs")
    for i, run in enumerate(runs if isinstance(runs, list) else []):
        for name in rec["metrics"]:
            if isinstance(run, dict) and isinstance(run.get(name), (int, float)):
                _check_metric(f"'extra.runs[{i}].{display_text(name)}'", run[name])
    return rec


_TRAIN_TYPES = {"epochs": (int, float), "tau_h": (int, float), "method": (str,), "arch": (str,),
                "loss_mode": (str,), "dataset": (str, dict), "layers": (str, int, list)}


def _check_type(block: dict, key: str, where: str, types: tuple, required: bool = False) -> None:
    """Field ``where.key``, when not null, is one of ``types`` (a bool never counts as a number)."""
    if required and key not in block:
        raise RecordError(f"record field '{where}.{key}' is missing")
    value = block.get(key)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        raise RecordError(f"record field '{where}.{key}' has type {type(value).__name__}")


def _check_metric(what: str, value) -> None:
    if value is None or isinstance(value, bool):
        return
    if not math.isfinite(value):
        raise RecordError(f"{what} is {value} (not finite)")
    if abs(value) > METRIC_BOUND:
        raise RecordError(f"{what} is {value:.3g}, beyond the sane bound of {METRIC_BOUND:g}")


def _check_tree(rec: dict) -> None:
    """Bounded shape, iteratively (a deep record must not exhaust the stack): nesting, strings, numbers.

    Non-finite floats are tolerated here (older records hold NaN in ``extra``; reports skip them);
    ``validate_record`` refuses them in metrics.
    """
    stack: list[tuple[Any, int, tuple]] = [(rec, 0, ())]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise RecordError(f"record nested deeper than {MAX_DEPTH} levels at '{_where(where)}'")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(k, str) and len(k) > MAX_STRING:
                    raise RecordError(f"record key of {len(k)} characters at '{_where(where)}' "
                                      f"(at most {MAX_STRING})")
                stack.append((v, depth + 1, (where, k)))
        elif isinstance(value, str):
            if len(value) > MAX_STRING:
                raise RecordError(f"record field '{_where(where)}' is a string of {len(value)} characters "
                                  f"(at most {MAX_STRING})")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
            raise RecordError(f"record field '{_where(where)}' is a number out of range")


def _where(where: tuple) -> str:
    """``(((), 'extra'), 'runs'), 0)`` -> ``extra.runs[0]`` (built only for an error message)."""
    parts = []
    while where:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else f".{display_text(key, 40)}")
    return "".join(reversed(parts)).lstrip(".")


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|\x9b[0-?]*[ -/]*[@-~]")

_LINE_BREAKS = frozenset("\t\n\r\u2028\u2029")
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def display_text(text: Any, limit: int | None = NAME_LIMIT) -> str:
    """Text from a record made safe to show anywhere (terminal, Markdown, HTML, LaTeX, plots).

    Why: names in records are whatever someone wrote. Terminal escape sequences and other control
    or bidi characters are removed, line breaks become spaces, and with ``limit`` the text is cut to
    ``limit`` characters ending in an ellipsis (a 200 KB name must not make a table or a plot
    unusable or slow). Each output format still escapes its own syntax on top of this.
    """
    text = _ANSI.sub("", str(text))
    text = "".join(" " if ch in _LINE_BREAKS else ch for ch in text
                   if ch in _LINE_BREAKS or (unicodedata.category(ch) != "Cc" and ch not in _BIDI))
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _finite(metrics: dict) -> dict:
    """Plain floats (numpy/torch scalars converted); NaN/inf become None, which JSON can hold."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            v = float(v)
            v = v if math.isfinite(v) else None
        out[k] = v
    return out


def _finite_tree(value: Any) -> Any:
    """``_finite`` through nested dicts and lists: a precision that is undefined (no positives
    predicted) or a diverged loss in a history is a missing number, not invalid JSON."""
    if isinstance(value, dict):
        return {k: _finite_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_tree(v) for v in value]
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return float(value) if math.isfinite(value) else None
    return value


def _reject_non_finite(value: Any, where: str) -> None:
    """``RecordError`` naming the first non-finite number under ``where`` (a config holding nan)."""
    stack = [(value, where)]
    while stack:
        v, key = stack.pop()
        if isinstance(v, dict):
            stack += [(x, f"{key}.{k}") for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(x, f"{key}[{i}]") for i, x in enumerate(v)]
        elif isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and not math.isfinite(v):
            raise RecordError(f"record field '{display_text(key)}' is {float(v)}; a record holds finite "
                              "numbers only (fix the value that produced it)")


def write_record(out_dir: str | os.PathLike, *, protocol: str, checkpoint: dict, dataset: dict,
                 metrics: dict, config: dict, started: str, ended: str | None = None,
                 wall_time_s: float, extra: dict | None = None, device: str | None = None) -> Path:
    """Validate and atomically write ``out_dir/result.json``; return its path.

    Non-finite numbers in ``metrics`` and ``extra`` become null (a metric that could not be
    computed); anywhere else (config, checkpoint, dataset) they are a ``RecordError`` naming the key,
    and nothing is written.
    """
    rec = {
        "schema_version": SCHEMA_VERSION,
        "protocol": protocol,
        "checkpoint": dict(checkpoint),
        "dataset": dict(dataset),
        "metrics": _finite(metrics),
        "config": config,
        "environment": environment(device),
        "started": started,
        "ended": ended or utc_now(),
        "wall_time_s": float(wall_time_s),
    }
    if extra is not None:
        rec["extra"] = _finite_tree(extra)
    for key in ("checkpoint", "dataset", "config", "environment", "wall_time_s"):
        _reject_non_finite(rec[key], key)
    validate_record(rec)
    path = Path(out_dir) / RECORD_NAME
    with atomic_path(path) as tmp:
        try:
            text = json.dumps(rec, indent=2, sort_keys=False, default=str, allow_nan=False)
        except ValueError as e:     # a non-finite number the checks above cannot see (a custom type)
            raise RecordError(f"record is not valid JSON: {e}") from None
        if len(text) >= MAX_RECORD_BYTES:
            raise RecordError(f"record would be {len(text)} bytes, over the {MAX_RECORD_BYTES} a report reads")
        tmp.write_text(text + "\n", encoding="utf-8")
    return path


def read_record(path: str | os.PathLike) -> dict:
    """Parse and validate one record; ``RecordError`` for broken or foreign JSON.

    Only a regular file is opened (checked before opening: a FIFO named ``result.json`` would hang,
    a link to ``/dev/zero`` would stream forever); ``cgh.io.read_json_file`` then reads it
    non-blocking, re-checks the opened file and reads at most ``MAX_RECORD_BYTES``.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        raise RecordError(f"{path}: not a readable JSON file ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise RecordError(f"{path}: not a regular file ({_file_kind(info.st_mode)})")
    try:
        rec = read_json_file(path, MAX_RECORD_BYTES)
    except (ValueError, OSError) as e:   # CghError from the reader; ValueError: a 5000-digit int
        reason = display_text(str(e).removeprefix(f"{path}: "), 200)
        raise RecordError(f"{path}: not a readable JSON file ({reason})") from None
    try:
        return validate_record(rec)
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a plain file"


@dataclass
class RunTimer:
    """Wall-clock bookkeeping for a record: ``started`` at creation, ``elapsed`` on demand."""
    started: str = field(default_factory=utc_now)
    _t0: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0
