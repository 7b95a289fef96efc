"""Linear probe: a linear classifier on the frozen backbone's pooled feature.

``fast=false`` (protocol "linear"): the standard protocol; the backbone stays in eval mode (BN
statistics frozen), training images get RandomResizedCrop + flip, validation Resize + CenterCrop,
SGD with a cosine schedule stepped per iteration (the authors' eval_lincls.py; ``lr_schedule_step
=epoch``: one value per epoch), validated after every epoch, resumable, DDP under torchrun.
``fast=true`` (protocol "linear_fast"): the same classifier and schedule trained on cached
centre-crop features, with no augmentation. Much cheaper, for quick comparisons; its numbers are
not the paper's protocol, hence the separate protocol name in the record.

Both record the last epoch's accuracy (``top1``/``top5``, also ``top1_last``/``top5_last``) and the
best epoch's (``top1_best``/``top5_best``/``best_epoch``: what eval_lincls.py prints);
``reported_epoch`` says which of the two the protocol's source reports (``extra.reported_epoch``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cgh.backbone import feature_dim
from cgh.config import bounded
from cgh.records import RunTimer
from eval.features import (ProtocolConfig, build_split, cached_features, check_choices, check_protocol_config,
                           check_same_classes, effective_precision, open_checkpoint, protocol_transforms, read_as,
                           select_device, workers, world, write_result)
from eval.metrics import topk_accuracy
from eval.training import (REPORTED_EPOCHS, SCHEDULE_STEPS, best_and_last, cosine_factor, fit,
                           flag_divergence)

STATE_NAME = "linear_state.pt"


@dataclass
class Config(ProtocolConfig):
    fast: bool = False                # true: protocol "linear_fast" on cached centre-crop features
    epochs: int = bounded(100, ge=1)
    lr: float = bounded(0.3, gt=0)    # PROTOCOLS.md: ImageNet 0.3, small datasets 3.0 (batch 256), no scaling
    momentum: float = bounded(0.9, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    seed: int = bounded(0, ge=0)      # data order / augmentation / head init
    # Cosine lr steps: "iteration" (the authors' eval_lincls.py: models/base_model.py schedule "cos";
    # ReSSL's linear_eval.py: CosineAnnealingLR over epochs x iterations) or "epoch" (one value per
    # epoch: base_model.py's "cos_epoch").
    lr_schedule_step: str = "iteration"
    # Which epoch a paper table shows; the record holds both. "best": eval_lincls.py prints best_acc1.
    reported_epoch: str = "best"
    cache_dir: Optional[str] = "~/.cache/cgh/features"   # fast mode's feature cache; "" or null disables it


class LinearProbe(nn.Module):
    """Frozen backbone, always in eval mode, and a trainable linear layer on its pooled feature."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = new_head(dim, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(x).flatten(1)
        with torch.autocast(x.device.type, enabled=False):   # the classifier itself trains in fp32
            return self.head(features.float())


HEAD_INITS = ("normal", "torchvision")


def new_head(dim: int, num_classes: int, init: str = "normal") -> nn.Linear:
    """The classifier. ``init``: "normal" = weight N(0, 0.01), bias 0 (MoCo's and the authors'
    linear-probe init, models/classifier.py); "torchvision" = nn.Linear's own (uniform) init, which
    the fc of ``torchvision.models.resnet50(num_classes=1000)`` keeps (the authors' eval_semisup.py)."""
    if init not in HEAD_INITS:
        raise ValueError(f"head init must be one of {HEAD_INITS}, got {init!r}")
    head = nn.Linear(dim, num_classes)
    if init == "normal":
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    return head


def lr_factor(cfg: Config) -> Callable[[int, int], float]:
    """The cosine factor at (global iteration, iterations per epoch), per ``cfg.lr_schedule_step``."""
    if cfg.lr_schedule_step == "iteration":
        return lambda step, per_epoch: cosine_factor(step, cfg.epochs * per_epoch)
    return lambda step, per_epoch: cosine_factor(step // per_epoch, cfg.epochs)


def run(cfg: Config) -> Path:
    timer = RunTimer()
    check_protocol_config(cfg)
    check_choices(cfg, lr_schedule_step=SCHEDULE_STEPS, reported_epoch=REPORTED_EPOCHS)
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    backbone, ckpt = open_checkpoint(cfg)
    train_tf, eval_tf, eval_desc = protocol_transforms(cfg)
    train_ds = build_split(cfg.dataset, cfg.data_root, cfg.train_split, eval_tf if cfg.fast else train_tf)
    val_ds = build_split(cfg.dataset, cfg.data_root, cfg.val_split, eval_tf)
    classes = check_same_classes(train_ds, val_ds, f"{cfg.dataset} at {cfg.data_root}")
    out = Path(cfg.output_dir)
    identity = {"checkpoint_sha256": ckpt.sha256, "arch": ckpt.arch, "num_classes": len(classes),
                "dataset": cfg.dataset, "fast": bool(cfg.fast), "epochs": cfg.epochs, "lr": cfg.lr,
                "batch_size": cfg.batch_size, "seed": cfg.seed, "lr_schedule_step": cfg.lr_schedule_step,
                "backbone_precision": cfg.backbone_precision}
    extra: dict = {"num_train": len(train_ds), "num_val": len(val_ds), "num_classes": len(classes),
                   "precision": effective_precision(cfg.backbone_precision, device),
                   "reported_epoch": cfg.reported_epoch}
    if cfg.fast:
        cache = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else None
        feats, hits = {}, {}
        for split, ds in ((cfg.train_split, train_ds), (cfg.val_split, val_ds)):
            *feats[split], hits[split] = cached_features(
                backbone, ckpt, ds, dataset=cfg.dataset, root=cfg.data_root, split=split, transform=eval_desc,
                cache_dir=cache, device=device, batch_size=cfg.batch_size, num_workers=workers(cfg),
                read_as=read_as(cfg), precision=cfg.backbone_precision)
        metrics, history = fit_on_features(*feats[cfg.train_split], *feats[cfg.val_split], len(classes), cfg, device)
        extra["feature_cache"] = {s: ("hit" if h else "miss") for s, h in hits.items()}
    else:
        model = LinearProbe(backbone, feature_dim(ckpt.arch), len(classes))
        optimizer = torch.optim.SGD(model.head.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        # drop_last: the authors' linear train loader drops the partial batch (samples/__init__.py)
        history = fit(model, train_ds, optimizer=optimizer, lr_factor=lr_factor(cfg), epochs=cfg.epochs,
                      batch_size=cfg.batch_size, num_workers=workers(cfg), device=device, state_module=model.head,
                      state_path=out / STATE_NAME, identity=identity, val_ds=val_ds, seed=cfg.seed,
                      precision=cfg.backbone_precision, drop_last=True, log=_log)
        metrics = best_and_last(history)
    extra["history"] = history
    flag_divergence(extra, history, _log)
    return write_result(cfg, protocol="linear_fast" if cfg.fast else "linear", checkpoint=ckpt.identity(),
                        dataset={"name": cfg.dataset, "root": str(cfg.data_root), "split": cfg.val_split,
                                 "train_split": cfg.train_split},
                        metrics=metrics, started=timer.started, wall_time_s=timer.elapsed,
                        extra=extra)


def fit_on_features(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                    num_classes: int, cfg: Config, device: torch.device) -> tuple[dict, list[dict]]:
    """The fast probe: same head, optimiser and cosine schedule (``cfg.lr_schedule_step``), minibatches
    of fixed features (the last partial one kept), validated after every epoch; returns the record's
    metrics (``best_and_last``) and the per-epoch history.

    Every process computes the same thing (the features are gathered everywhere), so no DDP here.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    head = new_head(train_f.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x, y = train_f.to(device), train_y.to(device)
    vx, vy = val_f.to(device), val_y.to(device)
    factor = lr_factor(cfg)
    per_epoch = -(-len(x) // cfg.batch_size)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        for step, start in enumerate(range(0, len(x), cfg.batch_size)):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor(epoch * per_epoch + step, per_epoch)
            idx = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        with torch.no_grad():
            acc = topk_accuracy(head(vx), vy, (1, 5))
        history.append({"epoch": epoch + 1, "loss": loss_sum.item() / per_epoch, "lr": opt.param_groups[0]["lr"],
                        "top1": acc[1], "top5": acc[5]})
    return best_and_last(history), history


def _log(msg: str) -> None:
    if world()[0] == 0:
        print(f"[linear] {msg}", flush=True)
