"""Hand-made result records for the report tests, written through the real ``write_record``."""
from __future__ import annotations

import hashlib
from pathlib import Path

from cgh.records import write_record

CGH_TRAIN = {"method": "cgh", "loss_mode": "cross", "layers": ["layer3", "layer4"], "tau_s": 0.1, "tau_t": 0.04,
             "tau_h": 0.08, "multi_crop": False, "predictor": False, "epochs": 8, "dataset": "synthshapes",
             "arch": "resnet18", "batch_size": 64}
RESSL_TRAIN = {**CGH_TRAIN, "method": "ressl", "loss_mode": "global"}


def checkpoint(name: str, method: str = "cgh", train: dict | None = None, folder: str = "ckpts",
               layout: str = "canonical") -> dict:
    """A checkpoint block like ``LoadedCheckpoint.identity()``; the sha256 is derived from the path."""
    path = f"/runs/{folder}/{name}.safetensors"
    block = {"path": path, "sha256": hashlib.sha256(path.encode()).hexdigest(), "method": method,
             "arch": "resnet18", "layout": layout, "name": name, "epoch": (train or {}).get("epoch", 8)}
    if train:
        block["train"] = train
    return block


class RecordWriter:
    """Writes records into numbered folders under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.count = 0

    def __call__(self, protocol: str, metrics: dict, ckpt: dict, dataset: str = "synthshapes",
                 subset: str | None = None, extra: dict | None = None, config: dict | None = None) -> Path:
        self.count += 1
        ds = {"name": dataset, "root": "/data", "split": "val"}
        if subset:
            ds["subset"] = subset
        return write_record(self.root / f"run{self.count:03d}", protocol=protocol, checkpoint=ckpt, dataset=ds,
                            metrics=metrics, config=config or {"note": "hand-made"}, started="2024-01-01T00:00:00+00:00",
                            wall_time_s=1.0, extra=extra)


def epochs(top1: float, top5: float, best_epoch: int = 10) -> dict:
    """Linear/semi metrics as their records hold them: last and best epoch (here the same epoch)."""
    return {"top1": top1, "top5": top5, "top1_last": top1, "top5_last": top5, "top1_best": top1,
            "top5_best": top5, "best_epoch": best_epoch}


def pretrain_history(epochs: int = 4, offset: float = 0.0) -> list[dict]:
    return [{"epoch": e, "loss": 6.0 - e - offset, "gh": 3.0 - e / 2, "hg": 3.0 - e / 2, "lr": 0.1,
             "knn_top1": 20.0 + 5 * e + offset, "pos_precision": 40.0 + e, "pos_recall": 10.0 + 4 * e + offset}
            for e in range(1, epochs + 1)]


def full_demo_like(root: Path) -> RecordWriter:
    """Records of every kind: what a demo run leaves behind (pretraining, every protocol, 3 checkpoints)."""
    w = RecordWriter(root)
    cgh = checkpoint("cgh", train=CGH_TRAIN)
    ressl = checkpoint("ressl", "ressl", train=RESSL_TRAIN)
    rand = checkpoint("random_init", "random-init")
    selection = {"0.002": {"precision": 35.0, "recall": 40.0}, "0.005": {"precision": 55.0, "recall": 20.0}}
    w("pretrain", {"loss": 2.0, "knn_top1": 40.0}, cgh, extra={"history": pretrain_history(), "positive_selection": selection})
    w("pretrain", {"loss": 2.5, "knn_top1": 35.0}, ressl,
      extra={"history": pretrain_history(offset=1.0), "positive_selection": selection})
    for ck, base in ((cgh, 60.0), (ressl, 55.0), (rand, 20.0)):
        w("knn", {"top1": base, "top5": base + 20, "best_k": 20, "top1_k10": base - 1, "top5_k10": base + 19,
                  "top1_k20": base, "top5_k20": base + 20, "top1_k50": base - 2, "top5_k50": base + 18}, ck)
        w("linear_fast", epochs(base + 5, base + 25), ck)
        w("semi", epochs(base - 10, base + 10), ck, subset="1percent")
        w("semi", epochs(base - 5, base + 15), ck, subset="10percent")
        w("voc_det", {"AP": base / 3, "AP50": base / 2, "AP75": base / 4}, ck, dataset="synthshapes_voc",
          extra={"runs": [{"AP": base / 3, "AP50": base / 2, "AP75": base / 4}]})
        w("coco_instseg", {"bbox_AP": base / 3, "bbox_AP50": base / 2, "bbox_AP75": base / 4, "segm_AP": base / 3.5,
                           "segm_AP50": base / 2.5, "segm_AP75": base / 5}, ck, dataset="synthshapes_coco")
        w("seg", {"mIoU": base / 2, "mAcc": base / 1.5, "aAcc": base}, ck, dataset="synthshapes_seg",
          extra={"per_class_iou": {"circle": base / 2}})
    return w
