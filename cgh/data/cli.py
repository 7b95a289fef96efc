"""``cgh data synth OUT`` (generate synthshapes) and ``cgh data check KIND ROOT`` (verify a dataset root)."""
from __future__ import annotations

import argparse
import time

from cgh.data import datasets
from cgh.data.shapes import CLASSIFICATION_SHAPES, DETECTION_SHAPES

CHECK_KINDS = datasets.CLASSIFICATION_KINDS + ("voc", "coco", "voc_aug", "cityscapes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{synth,check}")
    sub.required = True
    s = sub.add_parser("synth", help="write the synthetic benchmark in real on-disk formats")
    s.add_argument("out", help="output folder (new, empty, or a previous synthshapes root)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-classes", type=int, default=10, help=f"shape classes (2..{len(CLASSIFICATION_SHAPES)})")
    s.add_argument("--train-per-class", type=int, default=60)
    s.add_argument("--val-per-class", type=int, default=100)
    s.add_argument("--image-size", type=int, default=64, help="classification image size in pixels")
    s.add_argument("--det-classes", type=int, default=5, help=f"detection categories (1..{len(DETECTION_SHAPES)})")
    s.add_argument("--det-train", type=int, default=40, help="VOC2007 trainval scenes")
    s.add_argument("--det-train12", type=int, default=None, help="VOC2012 trainval scenes (default: --det-train)")
    s.add_argument("--det-test", type=int, default=20, help="VOC2007 test scenes (= COCO val2017)")
    s.add_argument("--det-image-size", type=int, default=128, help="detection/segmentation scene size")

    c = sub.add_parser("check", help="check a dataset root and print what was found")
    c.add_argument("kind", choices=CHECK_KINDS)
    c.add_argument("root")
    c.add_argument("--splits", nargs="+", default=None,
                   help="classification splits to open (default: train val; stl10/cifar: train test)")


def _synth(args: argparse.Namespace) -> int:
    from cgh.data.synth import generate
    start = time.perf_counter()
    m = generate(args.out, seed=args.seed, num_classes=args.num_classes, train_per_class=args.train_per_class,
                 val_per_class=args.val_per_class, image_size=args.image_size, det_classes=args.det_classes,
                 det_train=args.det_train, det_train12=args.det_train12, det_test=args.det_test,
                 det_image_size=args.det_image_size)
    cls, det = m["classification"], m["detection"]
    print(f"synthshapes (seed {m['seed']}) written to {args.out} in {time.perf_counter() - start:.1f}s")
    print(f"  classification: {len(cls['classes'])} classes, train {cls['splits']['train']}, "
          f"val {cls['splits']['val']}, subsets " + ", ".join(f"{k} {v['count']}" for k, v in cls["subsets"].items()))
    print(f"  VOC devkit: " + "; ".join(f"{y} " + ", ".join(f"{s} {n}" for s, n in c.items())
                                       for y, c in det["voc"].items()))
    print(f"  COCO: " + ", ".join(f"{s} {c['images']} images / {c['annotations']} instances"
                                  for s, c in det["coco"].items()))
    return 0


def _check(args: argparse.Namespace) -> int:
    kind, root = args.kind, args.root
    if kind == "voc":
        found = datasets.check_voc_root(root)
    elif kind == "coco":
        found = datasets.check_coco_root(root)
    elif kind in ("voc_aug", "cityscapes"):
        found = datasets.check_seg_root(kind, root)
    else:
        splits = args.splits or (["train", "test"] if kind in ("stl10", "cifar10", "cifar100") else ["train", "val"])
        found = {}
        for split in splits:
            ds = datasets.build_classification_dataset(kind, root, split)
            found[split] = f"{len(ds)} images, {len(ds.classes)} classes"
    print(f"{kind} root {root}: ok")
    for key, value in found.items():
        print(f"  {key}: {value}")
    return 0


def run(args: argparse.Namespace) -> int:
    return _synth(args) if args.data_command == "synth" else _check(args)
