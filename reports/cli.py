"""``cgh report RESULTS_DIR... -o OUT_DIR``: the paper-shaped report from ``result.json`` records."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from cgh.records import display_text
from reports.collect import (DEFAULT_EPOCH, add_epoch_argument, add_label_arguments, add_method_argument,
                             assign_labels, assign_methods, choose_epoch, collect, reference_sha)
from reports.render import Report, build_report, markdown_table, write_report


def make_report(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                title: str = "CGH report", described_as: str | None = None,
                methods: Sequence[str] = (), epoch: str = DEFAULT_EPOCH, labels: Sequence[str] = (),
                reference: str | None = None) -> tuple[Report, dict[str, Path]]:
    """Collect records under ``sources``, build every table and plot, write them to ``out_dir``.
    ``described_as`` names the sources in the report when listing them would be long; ``methods``
    are ``CKPT=METHOD`` statements (``assign_methods``); ``epoch`` picks the linear/semi epoch shown
    (``choose_epoch``); ``labels`` are ``CKPT=NAME`` (``assign_labels``); ``reference`` names the
    checkpoint the comparison view measures differences to."""
    collection = collect(sources)
    assign_methods(collection.records, methods)
    assign_labels(collection.records, labels)
    choose_epoch(collection.records, epoch)
    report = build_report(collection, [described_as] if described_as else [str(s) for s in sources], title,
                          reference_sha(collection.records, reference))
    return report, write_report(report, out_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS_DIR",
                        help="folders searched recursively for result.json records (or record files)")
    parser.add_argument("-o", "--output-dir", default="report", help="where the report is written")
    parser.add_argument("--title", default="CGH report", help="report title")
    add_method_argument(parser)
    add_label_arguments(parser)
    add_epoch_argument(parser)

def run(args: argparse.Namespace) -> int:
    report, paths = make_report(args.results, args.output_dir, args.title, methods=args.method,
                                epoch=args.epoch, labels=args.label, reference=args.reference)
    c = report.collection
    print(f"{len(c.records)} record(s) read, {len(c.skipped)} file(s) skipped")
    for path, reason in c.skipped:      # one line each; names from files never reach the terminal raw
        print(f"  skipped {display_text(path, None)}: {display_text(reason, None)}")
    if report.summary.rows:
        print(markdown_table(report.summary.display()))
    print(f"report: {paths['markdown']}\nhtml:   {paths['html']}\ntables: {paths['tables']}/ (CSV, LaTeX)")
    return 0
