"""Find result records under result folders; broken, foreign or duplicate files are reported and skipped.

Reports read nothing but ``result.json`` records (``cgh.records``): every stage writes one, so a
report can be rebuilt from any mix of folders, machines and toolkit versions. A file that is not a
valid record never stops the report; it is listed with the reason it was skipped. A record whose
content equals one already read (a copied run folder) is skipped too: counting it again would
change the means, standard deviations and run counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
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
    """``result.json`` entries under each folder (recursively); any other path is taken as given.

    Entries are not opened here (a FIFO or device is refused by ``read_record``); a file reached
    twice (through a link or a repeated argument) is listed once, under the first absolute path.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(p.rglob(RECORD_NAME)))
        elif os.path.lexists(p):
            found.append(p)
        else:
            raise CghError(f"results path not found: {p}")
    unique: dict[Path, Path] = {}
    for f in found:
        try:
            key = f.resolve()
        except (OSError, RuntimeError):     # a link loop: keep it; reading it gives the reason
            key = f.absolute()
        unique.setdefault(key, Path(os.path.abspath(f)))
    return list(unique.values())


def collect(paths: Iterable[str | os.PathLike]) -> Collection:
    """Read and validate every record under ``paths``; skip invalid ones and content duplicates."""
    out = Collection()
    first_of: dict[str, str] = {}       # sha256 of the canonical record -> path read first
    for path in find_record_files(paths):
        try:
            rec = read_record(path)
        except RecordError as e:
            out.skipped.append((str(path), str(e).removeprefix(f"{path}: ")))
            continue
        digest = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()
        if digest in first_of:
            out.skipped.append((str(path), f"duplicate of {first_of[digest]} (same content: one run, "
                                           "counted once)"))
            continue
        first_of[digest] = str(path)
        rec["_path"] = str(path)
        out.records.append(rec)
    return out


def matching_records(records: list[dict], ckpt: str, option: str) -> list[dict]:
    """The records of the checkpoint ``ckpt`` names: a checkpoint file (matched by its sha256), a
    sha256 prefix of 8+ hex digits, or the checkpoint's name or file name as recorded (or its
    --label). None matching is an error naming ``option``."""
    import re

    from cgh.io import sha256_file

    if Path(ckpt).is_file():
        sha = sha256_file(ckpt)
        match = lambda ck: ck["sha256"] == sha            # noqa: E731
    elif re.fullmatch(r"[0-9a-fA-F]{8,64}", ckpt):
        match = lambda ck: ck["sha256"].startswith(ckpt.lower())   # noqa: E731
    else:
        match = lambda ck: ckpt in (ck.get("name"), Path(str(ck.get("path", ""))).name,   # noqa: E731
                                    ck.get(LABEL_KEY))
    hits = [rec for rec in records if match(rec["checkpoint"])]
    if not hits:
        raise CghError(f"{option} {ckpt}: no checkpoint of the results matches it")
    return hits


def _statements(specs: Iterable[str], option: str, what: str) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        ckpt, sep, value = spec.partition("=")
        if not sep or not ckpt or not value.strip():
            raise CghError(f"{option} takes CKPT={what}, got {spec!r}")
        out.append((ckpt, value.strip()))
    return out


def assign_methods(records: list[dict], methods: Iterable[str]) -> None:
    """``--method CKPT=METHOD``: say what a checkpoint is when its file does not (records of a file in
    MoCo's layout are not placed in the paper's MoCo-v2 row unless the user says so)."""
    for ckpt, method in _statements(methods, "--method", "METHOD"):
        for rec in matching_records(records, ckpt, "--method"):
            rec["checkpoint"].update(method=method, method_source="user")


# The report's own key for a user's name of a checkpoint; a record file cannot set it (dropped on read).
LABEL_KEY = "report_label"


def assign_labels(records: list[dict], labels: Iterable[str]) -> None:
    """``--label CKPT=NAME``: the name a checkpoint goes by in every table and plot."""
    for rec in records:
        rec["checkpoint"].pop(LABEL_KEY, None)
    for ckpt, name in _statements(labels, "--label", "NAME"):
        for rec in matching_records(records, ckpt, "--label"):
            rec["checkpoint"][LABEL_KEY] = name


def reference_sha(records: list[dict], ckpt: str | None) -> str | None:
    """``--reference CKPT``: the sha256 of the checkpoint the comparison view measures differences to."""
    if not ckpt:
        return None
    shas = {rec["checkpoint"]["sha256"] for rec in matching_records(records, ckpt, "--reference")}
    if len(shas) > 1:
        raise CghError(f"--reference {ckpt}: matches {len(shas)} checkpoints; give a file or a sha256 prefix")
    return shas.pop()


# Protocols that validate after every epoch and record both the last and the best epoch's numbers.
EPOCH_PROTOCOLS = ("linear", "linear_fast", "semi")
EPOCH_METRICS = ("top1", "top5")
EPOCHS = ("best", "last")
# The CGH paper's linear and semi-supervised numbers come from the authors' eval_lincls.py /
# eval_semisup.py, which report the best validation epoch (as ReSSL's and MoCo's scripts do).
DEFAULT_EPOCH = "best"


def choose_epoch(records: list[dict], epoch: str = DEFAULT_EPOCH) -> None:
    """``--epoch best|last``: which epoch's top-1/top-5 the tables show for the linear and
    semi-supervised protocols. Records carry both (``top1_best``/``top1_last``); the chosen pair is
    copied into ``top1``/``top5`` and the choice into ``extra.reported_epoch``. A record written
    before best-epoch tracking has only its last epoch: with ``best`` it is flagged "last epoch"."""
    if epoch not in EPOCHS:
        raise CghError(f"--epoch must be one of {', '.join(EPOCHS)}, got {epoch!r}")
    for rec in records:
        if rec["protocol"] not in EPOCH_PROTOCOLS:
            continue
        metrics, extra = rec["metrics"], rec.setdefault("extra", {})
        chosen = {m: metrics.get(f"{m}_{epoch}") for m in EPOCH_METRICS}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in chosen.values()):
            metrics.update(chosen)
            extra["reported_epoch"] = epoch
        else:                       # only the final epoch's numbers exist (top1/top5 are the last)
            extra["reported_epoch"] = "last"


def add_epoch_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epoch", choices=EPOCHS, default=DEFAULT_EPOCH,
                        help="linear probe and semi-supervised: report the best validation epoch (as the "
                        "CGH authors' scripts did for the paper's numbers) or the last one (default: "
                        f"{DEFAULT_EPOCH}); each cell says which")


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", action="append", default=[], metavar="CKPT=NAME",
                        help="the name a checkpoint goes by in every table and plot (CKPT as for --method; "
                        "repeatable)")
    parser.add_argument("--reference", metavar="CKPT",
                        help="the checkpoint the comparison view measures differences to (default: the "
                        "paper's CGH numbers, where the paper has one for the evaluation)")


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", action="append", default=[], metavar="CKPT=METHOD",
                        help="what a checkpoint is (e.g. mocov2), for files that do not say it themselves: "
                        "only then is it placed in the paper's row of that method; CKPT is a file, a sha256 "
                        "prefix or the checkpoint's file name (repeatable)")
