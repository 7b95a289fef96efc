"""COCO instance segmentation transfer (protocol ``coco`` -> record ``coco_instseg``): Mask R-CNN.

R50-C4 with the 1x (default) or 2x schedule as in MoCo, or the R50-FPN variant
(``detectron2_config=transfer/detectron2/coco_R_50_FPN_1x_moco.yaml``). COCO 2017 train/val come
from a local folder (``train2017/``, ``val2017/``, ``annotations/instances_*.json``); detectron2's
COCO evaluator runs through pycocotools (``use_fast_impl=False``: the offline detectron2 install has
no C++ evaluator). The record holds box and mask AP, AP50, AP75. One run by default (``seeds``):
MoCo states a mean of 5 runs for VOC only (its detection/README.md).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cgh.config import ConfigError
from cgh.errors import DatasetError
from transfer.compat.detectron2_compat import import_detectron2
from transfer.detectron2_common import DatasetSpec, Detectron2Config, run_detectron2_protocol

PROTOCOL = "coco_instseg"


@dataclass
class Config(Detectron2Config):
    coco_root: str = ""                   # holds train2017/, val2017/, annotations/
    detectron2_config: str = "transfer/detectron2/coco_R_50_C4_1x_moco.yaml"
    train_split: str = "train2017"
    test_split: str = "val2017"
    dataset_name: str = "coco2017"


def _paths(root: Path, split: str) -> tuple[Path, Path]:
    return root / "annotations" / f"instances_{split}.json", root / split


def check_data(cfg) -> None:
    """Images and annotation files of both splits exist (one error lists every missing path)."""
    if not cfg.coco_root:
        raise ConfigError("config key 'coco_root' is required (the COCO folder, --coco-root)")
    root = Path(cfg.coco_root)
    missing = [str(p) for split in (cfg.train_split, cfg.test_split) for p in _paths(root, split)
               if not p.exists()]
    if missing:
        raise DatasetError(f"COCO data missing under {root}: expected " + ", ".join(missing))
    class_names(cfg)


def class_names(cfg) -> list[str]:
    """Category names of the test annotations (the smaller file), in category-id order."""
    ann, _ = _paths(Path(cfg["coco_root"]), cfg["test_split"])
    try:
        cats = json.loads(ann.read_text())["categories"]
        return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{ann} is not a COCO instances file with 'categories' ({e})") from None


def register_datasets(cfg) -> DatasetSpec:
    """Register both splits under names unique to the root; idempotent per process."""
    import_detectron2()
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    root = Path(cfg["coco_root"]).resolve()
    tag = hashlib.sha1(str(root).encode()).hexdigest()[:8]

    def register(split: str) -> str:
        name = f"cgh_coco_{split}_{tag}"
        if name not in DatasetCatalog.list():
            ann, images = _paths(root, split)
            register_coco_instances(name, {}, str(ann), str(images))
        return name

    return DatasetSpec(train=[register(cfg["train_split"])], test=register(cfg["test_split"]),
                       classes=class_names(cfg), record={
                           "name": cfg["dataset_name"], "root": str(cfg["coco_root"]),
                           "split": cfg["test_split"], "train_split": cfg["train_split"]})


def build_evaluator(cfg_d2, dataset_name: str, output_dir: str):
    import_detectron2()
    from detectron2.evaluation import COCOEvaluator

    tasks = ("bbox", "segm") if cfg_d2.MODEL.MASK_ON else ("bbox",)
    return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_dir, use_fast_impl=False)


def metrics(results: dict) -> dict[str, float]:
    return {f"{task}_{m}": results[task][m] for task in ("bbox", "segm") if task in results
            for m in ("AP", "AP50", "AP75")}


def run(cfg) -> Path:
    return run_detectron2_protocol(cfg, __name__)
