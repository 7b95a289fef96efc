"""Find result records under result folders; broken or foreign JSON is reported and skipped.

Reports read nothing but ``result.json`` records (``cgh.records``): every stage writes one, so a
report can be rebuilt from any mix of folders, machines and toolkit versions. A file that is not a
valid record never stops the report; it is listed with the reason it was skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from cgh.errors import CghError
from cgh.records import RECORD_NAME, RecordError, read_record


@dataclass
class Collection:
    """Valid records (each with ``_path`` added) and the files skipped, with why."""
    records: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)


def find_record_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """``result.json`` files under each folder (recursively); a file path is taken as given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(RECORD_NAME)))
        else:
            raise CghError(f"results path not found: {p}")
    unique = list(dict.fromkeys(f.resolve() for f in found))
    return unique


def collect(paths: Iterable[str | os.PathLike]) -> Collection:
    """Read and validate every record under ``paths``."""
    out = Collection()
    for path in find_record_files(paths):
        try:
            rec = read_record(path)
        except RecordError as e:
            out.skipped.append((str(path), str(e).removeprefix(f"{path}: ")))
            continue
        rec["_path"] = str(path)
        out.records.append(rec)
    return out
