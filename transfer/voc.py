"""PASCAL VOC detection transfer (protocol ``voc`` -> record ``voc_det``): Faster R-CNN R50-C4, MoCo style.

Train on VOC2007 trainval + VOC2012 trainval, test on VOC2007 test with detectron2's PASCAL VOC
evaluator (11-point AP for 2007, at IoU 0.50:0.95), report AP, AP50, AP75 as mean and std over
seeds (the protocol reports the mean of 5: the default ``seeds``). Datasets come from a local
VOCdevkit and are registered with the dataset's own class names (the 20 VOC classes by default).
"""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from cgh.config import ConfigError, bounded
from cgh.errors import DatasetError
from transfer.compat.detectron2_compat import import_detectron2
from transfer.detectron2_common import DatasetSpec, Detectron2Config, run_detectron2_protocol

PROTOCOL = "voc_det"
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


@dataclass
class Config(Detectron2Config):
    voc_root: str = ""                    # the VOCdevkit folder holding VOC2007/ and VOC2012/
    detectron2_config: str = "transfer/detectron2/voc_R_50_C4_24k_moco.yaml"
    train_sets: list[str] = field(default_factory=lambda: ["2007/trainval", "2012/trainval"])
    test_set: str = "2007/test"
    # "voc": the 20 PASCAL classes; "auto": the sorted names found in the training annotations;
    # or a comma-separated list. Every annotated name must be one of them.
    classes: str = "voc"
    dataset_name: str = "voc0712"
    # MoCo reports the mean of 5 runs on VOC (per-run std 0.2-0.4 AP; facebookresearch/moco,
    # detection/README.md); the record has the mean, the std and extra.seeds.
    seeds: int = bounded(5, ge=1)


def _parse_set(item: str) -> tuple[str, str]:
    year, sep, split = item.partition("/")
    if not sep or year not in ("2007", "2012") or not split:
        raise ConfigError(f"VOC sets look like 2007/trainval or 2012/trainval, got '{item}'")
    return year, split


def _image_ids(root: Path, year: str, split: str) -> list[str]:
    return (root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def check_data(cfg) -> None:
    """Every VOC year and split the run needs exists, before anything is built (one error lists all)."""
    if not cfg.voc_root:
        raise ConfigError("config key 'voc_root' is required (the VOCdevkit folder, --voc-root)")
    root = Path(cfg.voc_root)
    missing = []
    for item in list(cfg.train_sets) + [cfg.test_set]:
        year, split = _parse_set(item)
        base = root / f"VOC{year}"
        for path in (base / "JPEGImages", base / "Annotations", base / "ImageSets" / "Main" / f"{split}.txt"):
            if not path.exists():
                missing.append(str(path))
    if missing:
        raise DatasetError(f"VOC data missing under {root}: expected " + ", ".join(dict.fromkeys(missing)))
    class_names(cfg)


def class_names(cfg) -> list[str]:
    """The class list of the run; every object name in the training annotations must be in it."""
    root = Path(cfg["voc_root"])
    found: set[str] = set()
    for item in cfg["train_sets"]:
        year, split = _parse_set(item)
        for image_id in _image_ids(root, year, split):
            xml = root / f"VOC{year}" / "Annotations" / f"{image_id}.xml"
            try:
                found.update(o.findtext("name") for o in ET.parse(xml).findall("object"))
            except (OSError, ET.ParseError) as e:
                raise DatasetError(f"cannot read VOC annotation {xml}: {e}") from None
    spec = cfg["classes"]
    names = (list(VOC_CLASSES) if spec == "voc" else sorted(found) if spec == "auto"
             else [n.strip() for n in spec.split(",") if n.strip()])
    unknown = sorted(found - set(names))
    if unknown:
        raise DatasetError(f"VOC annotations under {root} name classes not in the class list "
                           f"({', '.join(unknown[:5])}); set classes=auto or list them")
    return names


def register_datasets(cfg) -> DatasetSpec:
    """Register the run's VOC sets under names unique to (root, classes); idempotent per process."""
    import_detectron2()
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_pascal_voc

    root = Path(cfg["voc_root"]).resolve()
    names = class_names(cfg)
    tag = hashlib.sha1(f"{root}|{','.join(names)}".encode()).hexdigest()[:8]

    def register(item: str) -> str:
        year, split = _parse_set(item)
        name = f"cgh_voc{year}_{split}_{tag}"
        if name not in DatasetCatalog.list():
            register_pascal_voc(name, str(root / f"VOC{year}"), split, int(year), names)
        return name

    train = [register(s) for s in cfg["train_sets"]]
    test = register(cfg["test_set"])
    return DatasetSpec(train=train, test=test, classes=names, record={
        "name": cfg["dataset_name"], "root": str(cfg["voc_root"]),
        "split": cfg["test_set"].replace("/", "_"),
        "train_split": "+".join(s.replace("/", "_") for s in cfg["train_sets"])})


def build_evaluator(cfg_d2, dataset_name: str, output_dir: str):
    import_detectron2()
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    return PascalVOCDetectionEvaluator(dataset_name)


def metrics(results: dict) -> dict[str, float]:
    box = results["bbox"]
    return {"AP": box["AP"], "AP50": box["AP50"], "AP75": box["AP75"]}


def run(cfg) -> Path:
    return run_detectron2_protocol(cfg, __name__)
