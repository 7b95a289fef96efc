"""``cgh convert CKPT --to FORMAT -o OUT``: rewrite a backbone for another toolkit, exactly.

The source is read like every protocol reads it (any known layout, nothing executed); the written
file is read back and compared tensor by tensor before the command reports success.
"""
from __future__ import annotations

import argparse

from transfer.convert import FORMATS, convert_checkpoint
from transfer.hub import LAYOUT_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="source checkpoint (any layout `cgh inspect` recognises)")
    parser.add_argument("--to", dest="to_fmt", required=True, choices=FORMATS,
                        help="canonical (.safetensors + .json), torchvision (.pth), detectron2 (.pkl), "
                             "mmseg (.pth for init_cfg Pretrained)")
    parser.add_argument("-o", "--output", required=True, help="output file")
    parser.add_argument("--from", dest="from_fmt", choices=LAYOUT_NAMES, help="force the source layout")
    parser.add_argument("--key", help="dict holding the weights in the source")
    parser.add_argument("--prefix", help="key prefix of the backbone in the source")


def run(args) -> int:
    ck, written = convert_checkpoint(args.checkpoint, args.to_fmt, args.output, from_fmt=args.from_fmt,
                                     key=args.key, prefix=args.prefix)
    print(f"{ck.path} ({ck.layout}, {ck.arch}, {len(ck.state_dict)} backbone tensors, "
          f"{len(ck.ignored)} entries ignored) -> {written} ({args.to_fmt}); read back bit-identical")
    return 0
