"""Weighted kNN classification on frozen features (the InstDisc/DINO vote the paper reports).

``weighted_knn`` is a pure function of tensors, shared with the pretraining monitor; the protocol
(``Config`` + ``run``) extracts centre-crop features through the feature cache, so sweeping k or T
costs no forward pass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from cgh.config import ConfigError
from cgh.records import RunTimer
from eval.features import (ProtocolConfig, build_split, cached_features, check_same_classes, eval_transform,
                           open_checkpoint, read_as, select_device, workers, write_result)
from eval.metrics import topk_accuracy

# Similarities held at once: chunk rows x train rows. 2**27 float32 = 512 MiB, so ImageNet
# (1.28M train features) runs ~100 val rows per chunk and never holds the 50k x 1.28M matrix.
SIMILARITY_BUDGET = 2 ** 27


def nearest_neighbours(train_features: torch.Tensor, test_features: torch.Tensor, k: int,
                       chunk_size: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Cosine k-nearest train rows of every test row, chunk by chunk: yields (first test row,
    similarities [c, k], train indices [c, k]), most similar first.

    Rows are L2-normalised here. ``chunk_size`` test rows at a time (default: as many as fit
    ``SIMILARITY_BUDGET``), so memory is bounded whatever the number of test rows; the work runs on
    the train features' device (GPU when they are on GPU).
    """
    n_train = train_features.shape[0]
    if not 1 <= k <= n_train:
        raise ValueError(f"k must lie in 1..{n_train} (the number of train features), got {k}")
    train = F.normalize(train_features, dim=1)
    if chunk_size is None:
        chunk_size = max(1, SIMILARITY_BUDGET // n_train)
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start:start + chunk_size].to(train.device, train.dtype), dim=1)
        sim, idx = (query @ train.T).topk(k, dim=1)
        yield start, sim, idx


def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 chunk_size: int | None = None) -> dict[int, torch.Tensor]:
    """Class scores of a cosine-similarity kNN vote, one [M, C] float32 tensor per k.

    train_features [N, D], train_labels [N] (class ids), test_features [M, D]. Each test row's k
    most similar train rows vote for their class with weight exp(sim / temperature). One neighbour
    search at the largest k serves every k. Memory and device: see ``nearest_neighbours``.
    """
    if not ks:
        raise ValueError("ks is empty")
    if train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train features but {train_labels.shape[0]} labels")
    device = train_features.device
    labels = train_labels.to(device=device, dtype=torch.long)
    scores = {k: torch.zeros(test_features.shape[0], num_classes, device=device) for k in ks}
    if min(ks) < 1:
        raise ValueError(f"k must be positive, got {list(ks)}")
    for start, sim, idx in nearest_neighbours(train_features, test_features, max(ks), chunk_size):
        weight = (sim.float() / temperature).exp()
        neighbour_labels = labels[idx]
        for k in ks:
            scores[k][start:start + idx.shape[0]].scatter_add_(1, neighbour_labels[:, :k], weight[:, :k])
    return scores


@dataclass
class Config(ProtocolConfig):
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07         # vote weight exp(sim / T), as in InstDisc/DINO and the paper
    chunk_size: int = 0               # val rows per similarity chunk; 0 = as many as fit SIMILARITY_BUDGET
    cache_dir: Optional[str] = "~/.cache/cgh/features"   # feature cache; "" or null disables it


def run(cfg: Config) -> Path:
    """Extract (or read cached) centre-crop features of train and val, vote, write result.json."""
    timer = RunTimer()
    ks = sorted(set(int(k) for k in cfg.ks))
    if not ks or ks[0] < 1:
        raise ConfigError(f"config key 'ks': need positive integers, got {list(cfg.ks)}")
    if cfg.temperature <= 0:
        raise ConfigError(f"config key 'temperature' must be > 0, got {cfg.temperature}")
    device = select_device(cfg.device)
    model, ckpt = open_checkpoint(cfg)
    tf, tf_desc = eval_transform(cfg.resize, cfg.crop)
    train_ds = build_split(cfg.dataset, cfg.data_root, cfg.train_split, tf)
    val_ds = build_split(cfg.dataset, cfg.data_root, cfg.val_split, tf)
    classes = check_same_classes(train_ds, val_ds, f"{cfg.dataset} at {cfg.data_root}")
    if ks[-1] > len(train_ds):
        raise ConfigError(f"config key 'ks': k={ks[-1]} exceeds the {len(train_ds)} images of split "
                          f"'{cfg.train_split}'")
    cache = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else None
    hits = {}
    feats = {}
    for split, ds in ((cfg.train_split, train_ds), (cfg.val_split, val_ds)):
        f, y, hits[split] = cached_features(model, ckpt, ds, dataset=cfg.dataset, root=cfg.data_root, split=split,
                                            transform=tf_desc, cache_dir=cache, device=device,
                                            batch_size=cfg.batch_size, num_workers=workers(cfg), read_as=read_as(cfg))
        feats[split] = (f, y)
    (train_f, train_y), (val_f, val_y) = feats[cfg.train_split], feats[cfg.val_split]
    scores = weighted_knn(train_f.to(device), train_y, val_f.to(device), len(classes), ks=ks,
                          temperature=cfg.temperature, chunk_size=cfg.chunk_size or None)
    metrics: dict[str, float] = {}
    for k in ks:
        acc = topk_accuracy(scores[k], val_y.to(device), (1, 5))
        metrics[f"top1_k{k}"], metrics[f"top5_k{k}"] = acc[1], acc[5]
    best = max(ks, key=lambda k: (metrics[f"top1_k{k}"], -k))   # ties go to the smaller k
    metrics = {"top1": metrics[f"top1_k{best}"], "top5": metrics[f"top5_k{best}"], "best_k": best, **metrics}
    return write_result(cfg, protocol="knn", checkpoint=ckpt.identity(),
                        dataset={"name": cfg.dataset, "root": str(cfg.data_root), "split": cfg.val_split,
                                 "train_split": cfg.train_split},
                        metrics=metrics, started=timer.started, wall_time_s=timer.elapsed,
                        extra={"num_train": len(train_ds), "num_val": len(val_ds), "num_classes": len(classes),
                               "feature_dim": int(train_f.shape[1]), "temperature": cfg.temperature,
                               "feature_cache": {s: ("hit" if h else "miss") for s, h in hits.items()}})
