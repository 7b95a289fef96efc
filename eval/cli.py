"""``cgh eval knn|linear|semi``: a config file, convenience flags, then ``key=value`` overrides.

Each flag is a shorthand for one config key (``--checkpoint X`` = ``checkpoint=X``); trailing
overrides are applied after the flags, so they win.
"""
from __future__ import annotations

import argparse
import json

from cgh.distributed import rank
from cgh.protocols import run_protocol
from cgh.records import read_record

# flag -> config key, for every protocol
FLAGS = {"checkpoint": "checkpoint", "data_root": "data_root", "dataset": "dataset", "output_dir": "output_dir"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL")
    sub.required = True
    helps = {"knn": "weighted kNN on frozen centre-crop features (cached)",
             "linear": "linear probe on the frozen backbone (fast=true: on cached features)",
             "semi": "fine-tune the whole network on a 1%%/10%% labelled subset"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML config (path, or name under configs/, e.g. eval/knn_imagenet)")
        p.add_argument("--checkpoint", help="any checkpoint the hub reads (= checkpoint=...)")
        p.add_argument("--data-root", help="dataset root (= data_root=...)")
        p.add_argument("--dataset", help="imagenet, tiny-imagenet, stl10, cifar10, cifar100, synthshapes, imagefolder")
        p.add_argument("--output-dir", "-o", help="where result.json goes (= output_dir=...)")
        p.add_argument("--overwrite", action="store_true", help="the output folder belongs to another run: "
                       "move it aside and start fresh (= overwrite=true)")
        if name == "linear":
            p.add_argument("--fast", action="store_true", help="train on cached features (protocol linear_fast)")
        if name == "semi":
            p.add_argument("--percent", choices=["1", "10"], help="the SimCLR 1%% or 10%% list (= subset=1percent/10percent)")
            p.add_argument("--subset", help="any subset list file in SimCLR format (= subset=PATH)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def overrides_from(args: argparse.Namespace) -> list[str]:
    out = [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag, None)]
    if getattr(args, "fast", False):
        out.append("fast=true")
    if getattr(args, "overwrite", False):
        out.append("overwrite=true")
    if getattr(args, "percent", None):
        out.append(f"subset={args.percent}percent")
    if getattr(args, "subset", None):
        out.append(f"subset={args.subset}")
    return out + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    path = run_protocol(args.protocol, args.config, overrides_from(args))
    if rank() != 0:      # under torchrun, one process reports
        return 0
    rec = read_record(path)
    print(f"{rec['protocol']}: {json.dumps(rec['metrics'])}")
    print(f"record: {path}")
    return 0
