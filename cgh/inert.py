"""Configs stored in files from elsewhere, read as inert data with bounded work.

A training checkpoint's ``config`` (or a canonical sidecar) is whatever its writer stored: one dict
reused at every level makes a 40 KB pickle describe 2**40 values (a "billion laughs"), and
``OmegaConf.create`` would resolve ``${oc.env:VAR}`` from the reader's environment into our
records. So nothing here uses OmegaConf: ``inert_copy`` copies plain dicts, lists and scalars,
counting a shared value each time it is reached, and strings stay literal. Going over a limit is an
``InertDataError`` (the caller names the file), never a truncated copy: a summary that silently
lost fields would be a record that lies.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cgh.errors import CghError

MAX_NODES = 10_000       # values visited, a shared one counted each time (a real config has ~100)
MAX_DEPTH = 16           # nesting (a real config nests 3 deep)
MAX_STRING = 4096        # characters in one string or key (PATH_MAX; records allow the same)
MAX_CHARS = 1_000_000    # characters in all strings and keys together
MAX_INT = 2 ** 63        # |int| below this (JSON readers and records handle it)


class InertDataError(CghError):
    """A stored config is too large, too deep or holds something other than plain values."""


def inert_copy(value: Any) -> Any:
    """``value`` as plain dicts (str keys), lists, str, int, float, bool and None, within the limits."""
    budget = {"nodes": MAX_NODES, "chars": MAX_CHARS}

    def text(s: str) -> str:
        if len(s) > MAX_STRING:
            raise InertDataError(f"holds a string of {len(s)} characters (at most {MAX_STRING})")
        budget["chars"] -= len(s)
        if budget["chars"] < 0:
            raise InertDataError(f"holds more than {MAX_CHARS} characters of text")
        return str(s)

    def copy(v: Any, depth: int) -> Any:
        budget["nodes"] -= 1
        if budget["nodes"] < 0:
            raise InertDataError(f"holds more than {MAX_NODES} values (a shared value counts each time)")
        if v is None or isinstance(v, (bool, np.bool_)):
            return None if v is None else bool(v)
        if isinstance(v, (int, np.integer)):
            if abs(int(v)) >= MAX_INT:
                raise InertDataError("holds an integer out of range")
            return int(v)
        if isinstance(v, (float, np.floating)):
            return float(v)
        if isinstance(v, str):
            return text(v)
        if isinstance(v, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise InertDataError(f"is nested deeper than {MAX_DEPTH} levels")
            if isinstance(v, dict):
                out = {}
                for k, item in v.items():
                    if not isinstance(k, str):
                        raise InertDataError(f"has a key of type {type(k).__name__} (keys are strings)")
                    out[text(k)] = copy(item, depth + 1)
                return out
            return [copy(item, depth + 1) for item in v]
        raise InertDataError(f"holds a {type(v).__name__} (only plain values are read)")

    return copy(value, 0)


# ``cgh.train.train_config_summary``'s keys: where each sits in a full config, and its type
# ("number" = int or float; the types ``cgh.records`` accepts in ``checkpoint.train``). A test checks
# the two agree on a genuine config.
SUMMARY_FIELDS: dict[str, tuple[str, str]] = {
    "method": ("method", "str"), "loss_mode": ("loss.mode", "str"), "layers": ("model.layers", "names"),
    "tau_s": ("loss.tau_s", "number"), "tau_t": ("loss.tau_t", "number"), "tau_h": ("loss.tau_h", "number"),
    "loss_schedule": ("loss.schedule", "str"), "multi_crop": ("data.multi_crop", "bool"),
    "predictor": ("model.predictor", "bool"), "epochs": ("optim.epochs", "int"),
    "dataset": ("data.dataset", "name"), "arch": ("model.arch", "str"),
    "batch_size": ("optim.batch_size", "int"), "queue_size": ("model.queue_size", "int"),
}


_KIND_NAMES = {"str": "string", "bool": "boolean", "int": "integer", "number": "number",
               "names": "list of stage names", "name": "string or object"}


def _is(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "name":   # a dataset: its name, or (older summaries) an object with one
        return isinstance(value, (str, dict))
    return isinstance(value, list) and all(   # "names": stages, by name or number
        isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in value)


def check_summary(summary: Any) -> dict:
    """A stored summary (a canonical sidecar's ``train_config``) copied inertly, known keys type-checked."""
    summary = inert_copy(summary)
    if not isinstance(summary, dict):
        raise InertDataError(f"is a {type(summary).__name__}, not an object")
    for key, (_, kind) in SUMMARY_FIELDS.items():
        if summary.get(key) is not None and not _is(summary[key], kind):
            raise InertDataError(f"field '{key}' is a {type(summary[key]).__name__}, not a {_KIND_NAMES[kind]}")
    return summary


def train_summary(config: Any) -> dict:
    """What ``cgh.train.train_config_summary`` gives, from a stored (untrusted) full config.

    Same keys; a key the config lacks (another version of cgh) is None; a key of the wrong type or
    a section that is not a dict is an error. Nothing is resolved or imported.
    """
    config = inert_copy(config)
    if not isinstance(config, dict):
        raise InertDataError(f"is a {type(config).__name__}, not a dict")
    out = {}
    for key, (where, kind) in SUMMARY_FIELDS.items():
        value: Any = config
        parts = where.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(value, dict):
                raise InertDataError(f"'{'.'.join(parts[:depth])}' is a {type(value).__name__}, not a section")
            value = value.get(part)
            if value is None:
                break
        if value is not None and not _is(value, kind):
            raise InertDataError(f"'{where}' is a {type(value).__name__}, not a {_KIND_NAMES[kind]}")
        out[key] = value
    return out
