"""Semi-supervised evaluation: fine-tune the whole network on a labelled subset (SimCLR 1% / 10%).

The subset is a SimCLR-format list of file basenames: the packaged ImageNet lists ("1percent",
"10percent", sha256-verified by ``cgh.data.subsets``), synthshapes' own lists, or any file. Every
listed image must exist in the train split. Two recipes ship as configs (PROTOCOLS.md): the paper's
(50 epochs, head lr 0.5 / 0.2, backbone lr 1e-4 / 2e-4, x0.1 at 30 and 40) and the authors' code
(SwAV style: 70 epochs, head lr 0.02, backbone lr 0.005, x0.1 at 30 and 60; this file's defaults).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from cgh.backbone import feature_dim
from cgh.config import bounded
from cgh.data.subsets import SUBSET_SHA256, load_subset, subset_indices
from cgh.errors import DatasetError
from cgh.records import RunTimer
from eval.features import (ProtocolConfig, build_split, check_same_classes, eval_transform, open_checkpoint,
                           select_device, train_transform, workers, world, write_result)
from eval.linear import new_head
from eval.training import evaluate, fit, flag_divergence, step_factor

STATE_NAME = "semi_state.pt"


@dataclass
class Config(ProtocolConfig):
    subset: str = "1percent"          # "1percent" / "10percent" / path of a SimCLR-format list
    recipe: str = "authors"           # which recipe the values below follow: "authors" or "paper" (a label)
    epochs: int = bounded(70, ge=1)
    backbone_lr: float = bounded(0.005, ge=0)
    head_lr: float = bounded(0.02, gt=0)
    milestones: list[int] = bounded(factory=lambda: [30, 60], ge=1)   # lr x gamma at these epochs
    gamma: float = bounded(0.1, gt=0)
    momentum: float = bounded(0.9, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    seed: int = bounded(0, ge=0)


def labelled_subset(ds: Dataset, names: list[str], where: str) -> Subset:
    """The images of ``ds`` whose basenames are listed; all must be there (else ``DatasetError``)."""
    samples = getattr(ds, "samples", None)
    if samples is None:
        raise DatasetError(f"{where}: subset lists name image files, but this dataset has no file list")
    return Subset(ds, subset_indices(samples, names))


def names_sha256(names) -> str:
    """Order-free fingerprint of a set of file names (records which images were used)."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def subset_label(spec: str) -> str:
    return spec if spec in SUBSET_SHA256 else Path(spec).name


def run(cfg: Config) -> Path:
    timer = RunTimer()
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    backbone, ckpt = open_checkpoint(cfg)
    eval_tf, _ = eval_transform(cfg.resize, cfg.crop)
    where = f"{cfg.dataset} at {cfg.data_root}"
    names = load_subset(cfg.subset, dataset=cfg.dataset, root=cfg.data_root)
    full_train = build_split(cfg.dataset, cfg.data_root, cfg.train_split, train_transform(cfg.crop))
    val_ds = build_split(cfg.dataset, cfg.data_root, cfg.val_split, eval_tf)
    classes = check_same_classes(full_train, val_ds, where)
    train_ds = labelled_subset(full_train, names, where)
    used = [os.path.basename(full_train.samples[i][0]) for i in train_ds.indices]
    model = nn.Sequential(backbone, new_head(feature_dim(ckpt.arch), len(classes)))
    # Separate learning rates: the new head learns fast, the pretrained backbone is only nudged.
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": cfg.backbone_lr},
                                 {"params": model[1].parameters(), "lr": cfg.head_lr}],
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    out = Path(cfg.output_dir)
    identity = {"checkpoint_sha256": ckpt.sha256, "arch": ckpt.arch, "num_classes": len(classes),
                "dataset": cfg.dataset, "subset_sha256": names_sha256(names), "epochs": cfg.epochs,
                "backbone_lr": cfg.backbone_lr, "head_lr": cfg.head_lr, "batch_size": cfg.batch_size,
                "seed": cfg.seed}
    milestones = list(cfg.milestones)
    history = fit(model, train_ds, optimizer=optimizer, lr_factor=lambda e: step_factor(e, milestones, cfg.gamma),
                  epochs=cfg.epochs, batch_size=cfg.batch_size, num_workers=workers(cfg), device=device,
                  state_module=model, state_path=out / STATE_NAME, identity=identity, seed=cfg.seed, log=_log)
    metrics = evaluate(model, val_ds, batch_size=cfg.batch_size, num_workers=workers(cfg), device=device)
    extra = {"recipe": cfg.recipe, "num_labelled": len(used), "num_val": len(val_ds),
             "num_classes": len(classes), "labelled_files_sha256": names_sha256(used), "history": history}
    flag_divergence(extra, history, _log)
    return write_result(cfg, protocol="semi", checkpoint=ckpt.identity(),
                        dataset={"name": cfg.dataset, "root": str(cfg.data_root), "split": cfg.val_split,
                                 "train_split": cfg.train_split, "subset": subset_label(cfg.subset)},
                        metrics=metrics, started=timer.started, wall_time_s=timer.elapsed, extra=extra)


def _log(msg: str) -> None:
    if world()[0] == 0:
        print(f"[semi] {msg}", flush=True)
