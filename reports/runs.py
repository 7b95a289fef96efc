"""``cgh runs DIR [--json]``: what has been run under DIR, finished or not.

One line per record (checkpoint label, protocol, dataset, headline metric, date, wall time) and one
per claimed run folder without a record yet: "running" while a cgh process holds its lock, else
"unfinished" (the same command resumes it). Records are read as ``cgh report`` reads them
(validated, size-bounded); folder claims through the bounded JSON reader.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cgh.errors import CghError
from cgh.io import read_json_file
from cgh.records import RECORD_NAME, display_text
from cgh.run_folder import RUN_FILE, folder_in_use
from reports.collect import collect
from reports.tables import PROTOCOL_METRICS, checkpoint_labels, record_flags

HEADLINE = {**{p: m[0] for p, m in PROTOCOL_METRICS.items()}, "pretrain": "loss"}
COLUMNS = ("checkpoint", "protocol", "dataset", "metric", "value", "started", "wall_time_s", "status", "folder")


def list_runs(roots: list[str | os.PathLike]) -> tuple[list[dict], list[tuple[str, str]]]:
    """(runs, skipped files): finished runs from their records, then claimed folders without one."""
    collection = collect(roots)
    labels = checkpoint_labels(collection.records)
    runs = []
    for rec in collection.records:
        metric = HEADLINE.get(rec["protocol"], "")
        ds = rec["dataset"]
        flags = sorted(record_flags(rec))
        runs.append({
            "checkpoint": labels[rec["checkpoint"]["sha256"]], "protocol": display_text(rec["protocol"]),
            "dataset": display_text(ds.get("name", "")) + (f" ({display_text(ds['subset'])})" if ds.get("subset") else ""),
            "metric": metric, "value": rec["metrics"].get(metric), "started": display_text(rec.get("started", "")),
            "wall_time_s": rec.get("wall_time_s"), "status": "done" + "".join(f" [{f}]" for f in flags),
            "folder": display_text(str(Path(rec["_path"]).parent) if "_path" in rec else "", None)})
    for root in roots:
        for claim in sorted(Path(root).rglob(RUN_FILE)):
            folder = claim.parent
            if (folder / RECORD_NAME).exists() or not claim.is_file():
                continue
            try:
                bound = read_json_file(claim, limit=64 * 1024)
            except CghError:
                bound = {}
            bound = bound if isinstance(bound, dict) else {}
            sha = str(bound.get("checkpoint_sha256") or "")
            runs.append({"checkpoint": display_text(sha[:12]) or "-", "protocol": display_text(bound.get("protocol", "?")),
                         "dataset": "", "metric": "", "value": None, "started": display_text(bound.get("claimed", "")),
                         "wall_time_s": None, "status": "running" if folder_in_use(folder) else "unfinished",
                         "folder": display_text(str(folder), None)})
    return runs, collection.skipped


def _fmt(value, key: str) -> str:
    if value is None or value == "":
        return "-"
    if key == "wall_time_s":
        s = int(round(value))
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="DIR", help="folders searched recursively for runs")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    runs, skipped = list_runs(args.results)
    if args.json:
        print(json.dumps({"runs": runs, "skipped": [{"path": display_text(p, None), "reason": display_text(r, None)}
                                                    for p, r in skipped]}, indent=2))
        return 0
    rows = [[_fmt(r[k], k) for k in COLUMNS if k != "metric"] for r in runs]
    for r, row in zip(runs, rows):
        row[3] = f"{r['metric']} {row[3]}" if r["metric"] and r["value"] is not None else row[3]
    header = [k.replace("_s", "").replace("_", " ") for k in COLUMNS if k != "metric"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    done = sum(r["status"].startswith("done") for r in runs)
    print(f"{len(runs)} run(s): {done} done, {len(runs) - done} not finished; {len(skipped)} file(s) skipped")
    return 0
