"""``cgh inspect CKPT``: say what a checkpoint holds before any protocol trusts it.

Prints the detected layout, the architecture, how many backbone tensors were found, and every
tensor that is missing, mis-shaped, non-finite (NaN/Inf) or left unused (heads, queues, the teacher,
optimizer state). Exit status 0 when the backbone is complete, 1 when a protocol would refuse it.
Names and values come from the file: the text report shows them without control characters, so a
key cannot forge a line of the report.
"""
from __future__ import annotations

import argparse
import json

from cgh.backbone import ARCHS
from cgh.errors import CghError
from cgh.records import display_text
from transfer import layouts
from transfer.hub import LAYOUT_NAMES, Inspection, inspect_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="checkpoint file (.pth/.pt/.tar/.pkl/.safetensors)")
    parser.add_argument("--from", dest="from_fmt", choices=LAYOUT_NAMES, help="force this layout")
    parser.add_argument("--key", help="dict holding the weights, e.g. state_dict or a/b/c for nested dicts")
    parser.add_argument("--prefix", help="key prefix of the backbone inside that dict, e.g. module.encoder_q.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--layouts", action="store_true", help="list the known layouts and exit")


def report_dict(r: Inspection) -> dict:
    ck = r.checkpoint
    return {**ck.identity(), "where": r.where, "depth": _depth(ck.arch),
            "backbone_tensors": len(ck.state_dict), "expected_tensors": len(ck.state_dict) + len(r.missing),
            "ok": r.ok, "missing": r.missing,
            "wrong_shape": [{"name": n, "found": list(f), "expected": list(e)} for n, f, e in r.wrong_shape],
            "non_finite": r.non_finite, "ignored": ck.ignored}


def _show(text) -> str:
    """Text from the file (a key, a method name) as one printable line."""
    return display_text(text, None)


def _depth(arch: str) -> int:
    stages, bottleneck, _ = ARCHS[arch]
    return sum(stages) * (3 if bottleneck else 2) + 2


def run(args) -> int:
    if args.layouts:
        for layout in layouts.LAYOUTS:
            print(f"{layout.name:12s} {layout.saved_by}")
        return 0
    if not args.checkpoint:
        raise CghError("give a checkpoint file (or --layouts to list the known layouts)")
    r = inspect_checkpoint(args.checkpoint, fmt=args.from_fmt, key=args.key, prefix=args.prefix)
    d = report_dict(r)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0 if r.ok else 1
    print(f"checkpoint  {_show(d['path'])}  (sha256 {d['sha256'][:16]}...)")
    print(f"layout      {d['layout']}  (backbone at {_show(d['where'] or 'top level')})")
    print(f"arch        {d['arch']}  (depth {d['depth']})")
    print(f"method      {_show(d['method'])}   epoch {d['epoch']}")
    print(f"backbone    {d['backbone_tensors']} of {d['expected_tensors']} tensors found")
    for name in r.missing:
        print(f"  MISSING      {name}")
    for name, found, expected in r.wrong_shape:
        print(f"  WRONG SHAPE  {name}: {found} in the file, {expected} expected")
    for name in r.non_finite:
        print(f"  NON-FINITE   {name}: holds NaN or Inf")
    print(f"unused      {len(d['ignored'])} entries (not part of the backbone)")
    for name in d["ignored"]:
        print(f"  unused       {_show(name)}")
    reasons = [what for what, found in (("missing", r.missing), ("mis-shaped", r.wrong_shape),
                                        ("NaN/Inf", r.non_finite)) if found]
    print("OK: every backbone tensor is present with the right shape and finite values" if r.ok else
          f"NOT LOADABLE: protocols refuse this checkpoint ({', '.join(reasons)} backbone tensors)")
    return 0 if r.ok else 1
