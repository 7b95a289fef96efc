"""Feature-extraction throughput (images/s) through the real path: dataset builder, DataLoader with
decoding and transforms, backbone forward (bf16 + channels_last on GPU), gather to CPU.

    python benchmarks/feature_extraction.py                          # CPU, generated synthshapes, R18
    python benchmarks/feature_extraction.py --dataset imagenet --root /data/imagenet --split val \\
        --arch resnet50 --resize 256 --crop 224 --device cuda --workers 16 --limit 10000
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.data import Subset

from cgh.backbone import build_backbone
from eval.features import build_split, eval_transform, extract_features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthshapes")
    p.add_argument("--root", help="dataset root (default: generate a synthshapes root in a temp dir)")
    p.add_argument("--split", default="train")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--resize", type=int, default=64)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.root is None:
        from cgh.data.synth import generate
        tmp = tempfile.TemporaryDirectory()
        args.root = tmp.name
        generate(args.root, num_classes=10, train_per_class=60, val_per_class=1, image_size=64,
                 det_train=1, det_test=1, det_image_size=64)
    tf, desc = eval_transform(args.resize, args.crop)
    ds = build_split(args.dataset, args.root, args.split, tf)
    if args.limit:
        ds = Subset(ds, range(min(args.limit, len(ds))))
    device = torch.device(args.device)
    model = build_backbone(args.arch)
    extract_features(model, Subset(ds, range(min(len(ds), 2 * args.batch_size))), batch_size=args.batch_size,
                     num_workers=args.workers, device=device)    # warm-up (kernels, allocator)
    t0 = time.perf_counter()
    feats, _ = extract_features(model, ds, batch_size=args.batch_size, num_workers=args.workers, device=device)
    elapsed = time.perf_counter() - t0
    print(f"{args.arch} on {device} ({'bf16 autocast, channels_last' if device.type == 'cuda' else 'fp32'}), "
          f"{args.dataset} {args.split}, {desc}, batch {args.batch_size}, workers {args.workers}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{len(ds)} images -> features {tuple(feats.shape)} in {elapsed:.2f} s: {len(ds) / elapsed:.1f} img/s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
