"""Registry of evaluation protocols: one name, one module, one config schema, one record.

Each protocol module defines a dataclass ``Config`` (with at least ``checkpoint: str`` and
``output_dir: str``) and ``run(cfg) -> Path`` that runs the protocol and returns the path of the
``result.json`` it wrote. ``cgh compare`` and the demo drive every protocol through this table, and
every run goes through ``run_configured``, which claims the output folder first (``cgh.run_folder``).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Sequence

from cgh.config import load_config, to_dict
from cgh.errors import CghError
from cgh.io import sha256_file
from cgh.run_folder import claimed_run_folder, run_identity

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
    return run_configured(name, load_protocol_config(name, config, overrides))


def run_configured(name: str, cfg) -> Path:
    """Run protocol ``name`` with a loaded config in its claimed output folder; return the record path.

    The folder is bound to (protocol, the checkpoint file's sha256, the settings), so a folder of
    another run is refused (or moved aside with ``overwrite``) before anything is read from it.
    Only the main process claims (``RANK`` 0 under torchrun, machine 0 of a multi-machine launch).
    """
    module = protocol_module(name)
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_file():
        raise CghError(f"checkpoint not found: {checkpoint}" + (" (a folder, not a file)" if checkpoint.is_dir() else ""))
    identity = run_identity(name, sha256_file(checkpoint), to_dict(cfg))
    main = int(os.environ.get("RANK", "0")) == 0 and int(getattr(cfg, "machine_rank", 0)) == 0
    with claimed_run_folder(cfg.output_dir, identity, overwrite=bool(cfg.overwrite), main=main):
        return module.run(cfg)
