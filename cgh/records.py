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
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cgh.errors import CghError
from cgh.io import atomic_write_json

SCHEMA_VERSION = 1
RECORD_NAME = "result.json"
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
    for key, typ in _REQUIRED.items():
        if key not in rec:
            raise RecordError(f"record lacks '{key}'")
        if not isinstance(rec[key], typ) or isinstance(rec[key], bool):
            raise RecordError(f"record field '{key}' has type {type(rec[key]).__name__}")
    if rec["schema_version"] > SCHEMA_VERSION:
        raise RecordError(f"record schema_version {rec['schema_version']} is newer than this "
                          f"toolkit's ({SCHEMA_VERSION})")
    for key in _CHECKPOINT_KEYS:
        if key not in rec["checkpoint"]:
            raise RecordError(f"record field 'checkpoint.{key}' is missing")
    for key in _DATASET_KEYS:
        if key not in rec["dataset"]:
            raise RecordError(f"record field 'dataset.{key}' is missing")
    for name, value in rec["metrics"].items():
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RecordError(f"metric '{name}' is not a number: {value!r}")
    if "extra" in rec and not isinstance(rec["extra"], dict):
        raise RecordError("record field 'extra' is not an object")
    return rec


def _finite(metrics: dict) -> dict:
    """Plain floats (numpy/torch scalars converted); NaN/inf become None, which JSON can hold."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            v = float(v)
            v = v if math.isfinite(v) else None
        out[k] = v
    return out


def write_record(out_dir: str | os.PathLike, *, protocol: str, checkpoint: dict, dataset: dict,
                 metrics: dict, config: dict, started: str, ended: str | None = None,
                 wall_time_s: float, extra: dict | None = None, device: str | None = None) -> Path:
    """Validate and atomically write ``out_dir/result.json``; return its path."""
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
        rec["extra"] = extra
    validate_record(rec)
    path = Path(out_dir) / RECORD_NAME
    atomic_write_json(path, rec)
    return path


def read_record(path: str | os.PathLike) -> dict:
    """Parse and validate one record; ``RecordError`` for broken or foreign JSON."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: not a readable JSON file ({e})") from None
    try:
        return validate_record(rec)
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from None


@dataclass
class RunTimer:
    """Wall-clock bookkeeping for a record: ``started`` at creation, ``elapsed`` on demand."""
    started: str = field(default_factory=utc_now)
    _t0: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0
