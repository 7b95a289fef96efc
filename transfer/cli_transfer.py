"""``cgh transfer voc|coco|seg``: detection and segmentation transfer from any ResNet checkpoint.

Flags are shorthands for config keys (``--voc-root R`` is ``voc_root=R``); trailing ``key=value``
overrides come last and win, e.g. ``detectron2.SOLVER.MAX_ITER=1000`` or
``mmseg.train_cfg.max_iters=1000``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cgh.io import sha256_file
from cgh.protocols import run_protocol

# flag -> (config key, protocols that take it)
_FLAGS = {
    "checkpoint": ("checkpoint", ("voc", "coco", "seg")),
    "output_dir": ("output_dir", ("voc", "coco", "seg")),
    "voc_root": ("voc_root", ("voc",)),
    "coco_root": ("coco_root", ("coco",)),
    "data_root": ("data_root", ("seg",)),
    "gpus": ("gpus", ("voc", "coco", "seg")),
    "num_machines": ("num_machines", ("voc", "coco")),
    "machine_rank": ("machine_rank", ("voc", "coco")),
    "dist_url": ("dist_url", ("voc", "coco")),
    "seeds": ("seeds", ("voc", "coco")),
    "overwrite": ("overwrite", ("voc", "coco", "seg")),
}
_HELP = {
    "voc": "Faster R-CNN R50-C4 on VOC07+12 -> VOC07 test (detectron2); record voc_det",
    "coco": "Mask R-CNN R50-C4 (1x/2x) or R50-FPN on COCO 2017 (detectron2); record coco_instseg",
    "seg": "FCN ResNet D8 on VOC12+aug or Cityscapes (mmsegmentation); record seg",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL")
    sub.required = True
    for name, help_text in _HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="protocol config (YAML; path or name under configs/, e.g. "
                       f"transfer/{name}_synth.yaml); defaults are the paper protocol")
        p.add_argument("--checkpoint", help="any ResNet checkpoint that `cgh inspect` reads")
        p.add_argument("--output-dir", help="run folder (default runs/transfer/<protocol>_<checkpoint name>_<its sha256[:12]>)")
        p.add_argument("--overwrite", action="store_true", default=None, help="the run folder belongs to "
                       "another run: move it aside and start fresh (= overwrite=true)")
        if name == "voc":
            p.add_argument("--voc-root", help="VOCdevkit folder holding VOC2007/ and VOC2012/")
        if name == "coco":
            p.add_argument("--coco-root", help="folder holding train2017/, val2017/, annotations/")
        if name == "seg":
            p.add_argument("--data-root", help="VOC2012 folder (with SegmentationClassAug, aug.txt) "
                           "or Cityscapes root, as the mmseg config expects")
        p.add_argument("--gpus", type=int, help="GPUs per machine")
        if name != "seg":
            p.add_argument("--num-machines", type=int, help="machines (detectron2's launcher)")
            p.add_argument("--machine-rank", type=int, help="this machine's rank")
            p.add_argument("--dist-url", help="tcp://HOST:PORT of machine 0 (several machines)")
            p.add_argument("--seeds", type=int, help="repeat N times (SEED 0..N-1); record mean and std "
                           + ("(default 5: MoCo's protocol reports the mean of 5)" if name == "voc" else "(default 1)"))
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def default_output_dir(protocol: str, checkpoint: str) -> Path:
    """``runs/transfer/<protocol>_<file stem>_<sha256[:12]>``: every pretraining run exports a
    ``backbone.safetensors``, so the stem alone would send different backbones to one folder."""
    path = Path(checkpoint)
    digest = sha256_file(path)[:12] if path.is_file() else "missing"
    return Path("runs") / "transfer" / f"{protocol}_{path.stem}_{digest}"


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Flags as ``key=value`` overrides, then the user's own (which win)."""
    out = []
    if args.output_dir is None and args.config is None and args.checkpoint:
        out.append(f"output_dir={default_output_dir(args.protocol, args.checkpoint)}")
    for attr, (key, protocols) in _FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None and args.protocol in protocols:
            out.append(f"{key}={value}")
    return out + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    record = run_protocol(args.protocol, args.config, overrides_from_args(args))
    print(record)
    return 0
