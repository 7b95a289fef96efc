"""``cgh compare CKPT... --suite demo|quick|full``: run a protocol suite on several checkpoints, rank them.

A suite (``configs/suites/NAME.yaml``) lists protocol runs: a name, a protocol of
``cgh.protocols``, a config and ``key=value`` overrides, where ``{data_root}`` and ``{work_dir}``
are filled in. Each (run, checkpoint) pair gets a fixed folder named after the checkpoint's sha256
and a hash of the run's fully resolved config, so a folder that already holds a valid record for
that checkpoint means the work is done: a second ``cgh compare`` (or one resumed after a crash)
skips it. Changing a setting of the suite gives a new folder instead of reusing a stale result.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import MISSING

from cgh.config import ConfigError, load_config, to_dict
from cgh.errors import CghError
from cgh.io import atomic_write_text, sha256_file
from cgh.protocols import load_protocol_config, protocol_module, run_configured
from cgh.records import RECORD_NAME, RecordError, read_record
from reports.collect import add_epoch_argument, add_label_arguments, add_method_argument

_PLACEHOLDER = "__set_by_cgh_compare__"


@dataclass
class SuiteRun:
    name: str = MISSING                # folder name of the run, unique within the suite
    protocol: str = MISSING            # a name of cgh.protocols.PROTOCOLS
    config: str = ""                   # protocol config (path or name under configs/); "" = its defaults
    overrides: list[str] = field(default_factory=list)   # key=value; {data_root}, {work_dir} filled in


@dataclass
class Suite:
    description: str = ""
    data_root: str = ""                # default for --data-root
    runs: list[SuiteRun] = field(default_factory=list)


@dataclass
class Outcome:
    run: str
    checkpoint: str
    status: str                        # "ran", "skipped" (record already there) or "failed"
    record: Path
    message: str = ""


def load_suite(name: str) -> Suite:
    """A suite by name (``demo`` -> configs/suites/demo.yaml) or path."""
    suite = load_config(Suite, name if Path(name).is_file() else f"suites/{name}")
    names = [r.name for r in suite.runs]
    if not names:
        raise ConfigError(f"suite '{name}' lists no runs")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"suite '{name}': run names must be unique, repeated: {', '.join(dupes)}")
    for r in suite.runs:
        protocol_module(r.protocol)     # unknown protocol -> CghError naming it
    return suite


def _fill(overrides: Sequence[str], data_root: str, work_dir: Path, run: str) -> list[str]:
    out = []
    for item in overrides:
        if "{data_root}" in item and not data_root:
            raise CghError(f"suite run '{run}' needs a data root (--data-root): {item}")
        out.append(item.replace("{data_root}", data_root).replace("{work_dir}", str(work_dir)))
    return out


def run_dir(work_dir: Path, run: str, checkpoint_sha: str, cfg) -> Path:
    """``work_dir/runs/<run>/<checkpoint sha[:16]>-<config hash[:8]>``: the same inputs, the same folder."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("checkpoint", "output_dir")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return work_dir / "runs" / run / f"{checkpoint_sha[:16]}-{digest[:8]}"


def _done(record: Path, checkpoint_sha: str) -> bool:
    if not record.is_file():
        return False
    try:
        return read_record(record)["checkpoint"]["sha256"] == checkpoint_sha
    except RecordError:
        return False


def compare(checkpoints: Sequence[str | os.PathLike], suite_name: str, work_dir: str | os.PathLike,
            data_root: str = "", only: Sequence[str] = (), log=print) -> list[Outcome]:
    """Run every suite entry on every checkpoint unless its record exists; return what happened."""
    suite = load_suite(suite_name)
    work = Path(work_dir).resolve()
    data_root = str(Path(data_root).resolve()) if data_root else suite.data_root
    runs = [r for r in suite.runs if not only or r.name in only]
    unknown = sorted(set(only) - {r.name for r in suite.runs})
    if unknown:
        raise CghError(f"--only names runs not in suite '{suite_name}': {', '.join(unknown)}")
    ckpts = []
    for c in checkpoints:
        path = Path(c).resolve()
        if not path.is_file():
            raise CghError(f"checkpoint not found: {c}")
        ckpts.append((path, sha256_file(path)))
    outcomes = []
    for entry in runs:
        overrides = _fill(entry.overrides, data_root, work, entry.name)
        for path, sha in ckpts:
            cfg = load_protocol_config(entry.protocol, entry.config or None,
                                       overrides + [f"checkpoint={path}", f"output_dir={_PLACEHOLDER}"])
            out = run_dir(work, entry.name, sha, cfg)
            record = out / RECORD_NAME
            if _done(record, sha):
                log(f"[compare] {entry.name} on {path.name}: record exists, skipped ({record})")
                outcomes.append(Outcome(entry.name, str(path), "skipped", record))
                continue
            cfg.output_dir = str(out)
            log(f"[compare] {entry.name} on {path.name}: running {entry.protocol} -> {out}")
            t0 = time.perf_counter()
            try:
                written = Path(run_configured(entry.protocol, cfg))
                outcomes.append(Outcome(entry.name, str(path), "ran", written))
                log(f"[compare] {entry.name} on {path.name}: done in {time.perf_counter() - t0:.0f} s")
            except Exception as e:  # one failing run must not lose the others; its traceback is kept
                atomic_write_text(out / "error.txt", traceback.format_exc())
                msg = f"{type(e).__name__}: {e}"
                log(f"[compare] {entry.name} on {path.name}: FAILED ({msg}); traceback in {out / 'error.txt'}")
                outcomes.append(Outcome(entry.name, str(path), "failed", record, msg))
    return outcomes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints in any layout the hub reads")
    parser.add_argument("--suite", default="quick", help="demo, quick, full (configs/suites/) or a suite file")
    parser.add_argument("--output-dir", default="compare_out", help="runs go to OUT/runs, the report to OUT/report")
    parser.add_argument("--data-root", default="", help="the folder holding the suite's datasets, filled into its "
                        "{data_root}: imagenet/, VOCdevkit/, coco/ (quick, full) or a synthshapes root (demo)")
    parser.add_argument("--only", nargs="*", default=[], metavar="RUN", help="run only these suite entries")
    parser.add_argument("--title", default="", help="report title")
    add_method_argument(parser)
    add_label_arguments(parser)
    add_epoch_argument(parser)


def run(args: argparse.Namespace) -> int:
    from reports.cli import make_report
    from cgh.records import display_text
    from reports.render import markdown_table

    work = Path(args.output_dir)
    outcomes = compare(args.checkpoints, args.suite, work, args.data_root, args.only)
    # the report covers what this invocation asked for, not every run the folder ever held
    records = [o.record for o in outcomes if o.status != "failed"]
    report, paths = make_report(records, work / "report", args.title or f"cgh compare: suite {args.suite}",
                                described_as=f"{work / 'runs'} (the {len(records)} runs of this comparison)",
                                methods=args.method, epoch=args.epoch,
                                labels=args.label, reference=args.reference)
    for path, reason in report.collection.skipped:
        print(f"skipped {display_text(path, None)}: {display_text(reason, None)}")
    for table in report.rankings:
        print(f"\n{table.title}\n{markdown_table(table.display())}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "skipped", "failed")}
    print(f"\n{counts['ran']} run(s), {counts['skipped']} skipped (already done), {counts['failed']} failed")
    for o in outcomes:
        if o.status == "failed":
            print(f"  failed: {o.run} on {o.checkpoint}: {o.message}")
    print(f"report: {paths['markdown']}\nhtml:   {paths['html']}")
    return 1 if counts["failed"] else 0
