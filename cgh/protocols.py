"""Registry of evaluation protocols: one name, one module, one config schema, one record.

Each protocol module defines a dataclass ``Config`` (with at least ``checkpoint: str`` and
``output_dir: str``) and ``run(cfg) -> Path`` that runs the protocol and returns the path of the
``result.json`` it wrote. ``cgh compare`` and the demo drive every protocol through this table.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

from cgh.config import load_config
from cgh.errors import CghError

PROTOCOLS: dict[str, str] = {
    "knn": "eval.knn",
    "linear": "eval.linear",
    "semi": "eval.semi",
    "voc": "transfer.voc",
    "coco": "transfer.coco",
    "seg": "transfer.seg",
}


def protocol_module(name: str):
    if name not in PROTOCOLS:
        raise CghError(f"unknown protocol '{name}'; known: {', '.join(PROTOCOLS)}")
    return importlib.import_module(PROTOCOLS[name])


def load_protocol_config(name: str, config: str | None, overrides: Sequence[str] = ()):
    return load_config(protocol_module(name).Config, config, overrides)


def run_protocol(name: str, config: str | None, overrides: Sequence[str] = ()) -> Path:
    """Load the protocol's config (file + ``key=value`` overrides), run it, return its record path."""
    cfg = load_protocol_config(name, config, overrides)
    return protocol_module(name).run(cfg)
