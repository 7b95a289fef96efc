"""The layer every classification protocol shares: checkpoint -> backbone, datasets, transforms,
feature extraction and its on-disk cache.

Features are centre-crop pooled backbone outputs. They are cached under a key made of everything
that determines them (checkpoint sha256 and how it was read, dataset root/split/file list,
transform, precision), so re-running kNN or a fast linear probe, or sweeping k and T, costs no
forward pass, and a changed input can never reuse stale features.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from omegaconf import MISSING
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from cgh.backbone import ArchError, build_backbone, load_backbone_weights
from cgh.config import ConfigError, bounded, save_config, to_dict
from cgh.distributed import barrier, init_distributed, rank, world_size
from cgh.errors import DatasetError
from cgh.io import atomic_path
from cgh.records import RECORD_NAME, write_record
from transfer.hub import LoadedCheckpoint, load_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 1
PRECISIONS = ("fp32", "bf16")                 # backbone_precision: what the forward passes compute in
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


@dataclass
class ProtocolConfig:
    """Settings every classification protocol shares: which backbone, which data, how to read it."""
    checkpoint: str = MISSING         # any file transfer.hub reads (canonical, MoCo, ReSSL, ...)
    output_dir: str = MISSING         # result.json (and the run's own files) go here
    checkpoint_format: str = ""       # force a hub layout; "" = detect
    checkpoint_key: str = ""          # hub: sub-dict holding the weights, for unknown layouts
    checkpoint_prefix: str = ""       # hub: key prefix of the backbone, for unknown layouts
    arch: str = ""                    # expected ResNet; "" = whatever the checkpoint holds
    dataset: str = "imagenet"         # a cgh.data.datasets name (imagenet, tiny-imagenet, stl10, cifar10, synthshapes, ...)
    data_root: str = MISSING
    train_split: str = "train"
    val_split: str = "val"
    resize: int = bounded(256, ge=1)  # evaluation: Resize(resize) + CenterCrop(crop)
    crop: int = bounded(224, ge=1, le="resize")
    # Resize's filter: bilinear = torchvision's default, which the authors' eval_lincls.py and
    # eval_semisup.py use; their eval_knn.py (as DINO's) asks for bicubic (knn.Config's default).
    interpolation: str = "bilinear"
    # Backbone forward passes on GPU (feature extraction, training, validation): fp32 as in the
    # authors' eval scripts (no autocast); bf16 = autocast, a faster opt-in mode, labelled in the
    # record (extra.precision). A CPU always computes in fp32. (fp32 = no autocast; cuDNN may still
    # use TF32 for convolutions, torch's default, as in the authors' runs.)
    backbone_precision: str = "fp32"
    batch_size: int = bounded(256, ge=1)   # global batch (split over processes under torchrun)
    num_workers: int = -1             # data loader workers per process; -1 = default_num_workers()
    device: str = "auto"              # auto = this process's GPU if any, else CPU
    overwrite: bool = False           # output_dir belongs to another run: move it aside, start fresh


def check_choices(cfg, **allowed) -> None:
    """``ConfigError`` naming the key and its allowed values when a string setting is not one of them."""
    for key, values in allowed.items():
        if getattr(cfg, key) not in values:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(values)}; got {getattr(cfg, key)!r}")


def check_protocol_config(cfg: ProtocolConfig) -> None:
    """The enumerated settings every protocol shares."""
    check_choices(cfg, interpolation=tuple(INTERPOLATIONS), backbone_precision=PRECISIONS)


def effective_precision(precision: str, device: torch.device) -> str:
    """What the forward passes really compute in: ``precision`` on a GPU, fp32 on a CPU."""
    return precision if torch.device(device).type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for on a GPU; otherwise a disabled context (plain fp32)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=effective_precision(precision, device) == "bf16")


def open_checkpoint(cfg: ProtocolConfig) -> tuple[nn.Module, LoadedCheckpoint]:
    return load_model(cfg.checkpoint, fmt=cfg.checkpoint_format, key=cfg.checkpoint_key,
                      prefix=cfg.checkpoint_prefix, arch=cfg.arch)


def read_as(cfg: ProtocolConfig) -> dict:
    """How the checkpoint was read (part of the feature-cache key: one file, several backbones)."""
    return {k: v for k, v in (("format", cfg.checkpoint_format), ("key", cfg.checkpoint_key),
                              ("prefix", cfg.checkpoint_prefix)) if v}


def workers(cfg: ProtocolConfig) -> int:
    return resolve_num_workers(cfg.num_workers)


def write_result(cfg: ProtocolConfig, **record) -> Path:
    """Process 0 writes ``config.yaml`` and ``result.json`` in ``cfg.output_dir``; every process
    returns the record's path once it exists."""
    out = Path(cfg.output_dir)
    if rank() == 0:
        save_config(cfg, out)
        write_record(out, config=to_dict(cfg), **record)
    barrier()
    return out / RECORD_NAME


# ---------------------------------------------------------------- devices and processes
def select_device(name: str = "auto") -> torch.device:
    """This process's device (``auto``: its GPU if any, else CPU); under ``torchrun`` this also joins
    the process group (NCCL on GPU, gloo on CPU), so every protocol runs multi-process unchanged."""
    return init_distributed(name)


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside ``torch.distributed``."""
    return rank(), world_size()


def default_num_workers() -> int:
    """Loader workers per process when a config says -1: ``$CGH_NUM_WORKERS`` if set, else the CPUs
    this process may use, shared among the processes of this node (``LOCAL_WORLD_SIZE`` under
    torchrun), less one for the main process, at most 32. A compiled ResNet-50 CGH step on an H100
    consumes ~2600 img/s, ~18 workers' worth of JPEG decoding (BENCHMARKS.md)."""
    if "CGH_NUM_WORKERS" in os.environ:
        return int(os.environ["CGH_NUM_WORKERS"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(32, per_process - 1))


def resolve_num_workers(requested: int) -> int:
    """A config's ``num_workers``: itself when >= 0, ``default_num_workers()`` when -1."""
    if requested < -1:
        raise ConfigError(f"num_workers must be >= 0, or -1 for one per free CPU (got {requested})")
    return default_num_workers() if requested == -1 else requested


# ---------------------------------------------------------------- backbone
def load_model(checkpoint: str | os.PathLike, *, fmt: str | None = None, key: str | None = None,
               prefix: str | None = None, arch: str = "") -> tuple[nn.Module, LoadedCheckpoint]:
    """Build the checkpoint's ResNet (fc = identity) with every backbone tensor loaded, in eval mode.

    ``arch`` (optional) is what the caller expects; a checkpoint holding another depth is an error
    rather than a silently different experiment.
    """
    ckpt = load_backbone(checkpoint, fmt=fmt or None, key=key or None, prefix=prefix or None)
    if arch and arch != ckpt.arch:
        raise ArchError(f"{ckpt.path} holds a {ckpt.arch} backbone but the config asks for {arch}")
    model = build_backbone(ckpt.arch)
    load_backbone_weights(model, ckpt.state_dict)
    return model.eval(), ckpt


# ---------------------------------------------------------------- transforms and datasets
def eval_transform(resize: int, crop: int, interpolation: str = "bilinear",
                   std: Sequence[float] = IMAGENET_STD) -> tuple[Callable, str]:
    """Resize(shorter side) + CenterCrop + ImageNet normalisation, and a description for cache keys.

    ``interpolation``: "bilinear" or "bicubic" (PIL's filters; an image whose shorter side already
    is ``resize`` is not resampled). ``std``: the normalisation's std (the authors' semi-supervised
    script uses 0.228 for red); the description names it when it is not ImageNet's.
    """
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"config key 'interpolation' must be one of {', '.join(INTERPOLATIONS)}; "
                          f"got {interpolation!r}")
    tf = T.Compose([T.Resize(resize, interpolation=INTERPOLATIONS[interpolation]), T.CenterCrop(crop),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, tuple(std))])
    norm = "imagenet-norm" if tuple(std) == IMAGENET_STD else f"imagenet-mean-std{','.join(map(str, std))}"
    return tf, f"resize{resize}-{interpolation}-centercrop{crop}-{norm}"


def train_transform(crop: int, std: Sequence[float] = IMAGENET_STD) -> Callable:
    """RandomResizedCrop + horizontal flip: the augmentation of the linear and semi-supervised protocols."""
    return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, tuple(std))])


def protocol_transforms(cfg: ProtocolConfig) -> tuple[Callable, Callable, str]:
    """(train, eval, eval description) of a protocol config: RandomResizedCrop(crop) + flip, and
    Resize(resize, ``cfg.interpolation``) + CenterCrop(crop); ImageNet mean, and ``cfg.normalize_std``
    where the protocol has that key (semi), else ImageNet's std."""
    std = tuple(float(v) for v in getattr(cfg, "normalize_std", IMAGENET_STD))
    eval_tf, desc = eval_transform(cfg.resize, cfg.crop, cfg.interpolation, std)
    return train_transform(cfg.crop, std), eval_tf, desc


def build_split(name: str, root: str | os.PathLike, split: str, transform: Callable | None) -> Dataset:
    """A classification split through the shared dataset builders; an empty split is an error."""
    from cgh.data.datasets import build_classification_dataset

    ds = build_classification_dataset(name, root, split, transform)
    if len(ds) == 0:
        raise DatasetError(f"split '{split}' of the {name} dataset at {root} holds no images")
    return ds


def check_same_classes(train: Dataset, val: Dataset, where: str) -> list[str]:
    """Train and val must name the same classes in the same order, or labels mean different things."""
    a, b = list(getattr(train, "classes", [])), list(getattr(val, "classes", []))
    if a != b:
        only = sorted(set(a) ^ set(b))[:5]
        raise DatasetError(f"{where}: train and val splits have different classes "
                           f"({len(a)} vs {len(b)}; e.g. {', '.join(only) or 'same names, other order'})")
    return a


def targets_of(ds: Dataset) -> list[int]:
    if isinstance(ds, Subset):
        base = targets_of(ds.dataset)
        return [base[i] for i in ds.indices]
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    if targets is None:
        raise DatasetError(f"dataset {type(ds).__name__} exposes no targets")
    return [int(t) for t in targets]


def dataset_fingerprint(ds: Dataset) -> str:
    """sha256 of the ordered file list and labels (or, for array datasets, of the labels and size)."""
    h = hashlib.sha256()
    samples = getattr(ds, "samples", None)
    if samples is not None:
        root = str(getattr(ds, "root", ""))
        for path, target in samples:
            h.update(f"{os.path.relpath(path, root) if root else path}\t{target}\n".encode())
    else:
        h.update(f"{type(ds).__name__}\t{len(ds)}\n".encode())
        h.update(",".join(map(str, targets_of(ds))).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- extraction
@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, num_workers: int | None = None,
                     device: torch.device | str = "cpu", precision: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features [N, D] (float32, CPU) and labels [N] of ``dataset``, in dataset order.

    GPU: channels_last, ``precision`` "bf16" (autocast; this function's default, kept for the
    pretraining monitor and the benchmark) or "fp32" (what the protocols pass by default), features
    kept on the GPU until the end (no per-batch host sync). CPU: always fp32. Under
    ``torch.distributed`` every process embeds every world-th image and the shards are gathered
    back into dataset order, so the result is the same on every process.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    rank, size = world()
    n = len(dataset)
    shard = Subset(dataset, range(rank, n, size)) if size > 1 else dataset
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval().to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False,
                        num_workers=default_num_workers() if num_workers is None else num_workers,
                        pin_memory=cuda, drop_last=False)
    feats, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            out = model(images)
        feats.append(out.float().flatten(1))
        labels.append(torch.as_tensor(targets).to(device, non_blocking=True))
    model.train(was_training)
    if feats:
        features, targets = torch.cat(feats), torch.cat(labels).long()
    else:  # a process whose shard is empty (more processes than images)
        dim = model(torch.zeros(1, 3, 32, 32, device=device)).flatten(1).shape[1]
        features, targets = torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
    if size > 1:
        features, targets = _gather_in_order(features, targets, n, size)
    return features.cpu(), targets.cpu()


def _gather_in_order(features: torch.Tensor, targets: torch.Tensor, n: int, size: int):
    """Rank r holds items r, r+size, ...: pad the shards to one length, gather, interleave, trim."""
    per = -(-n // size)
    pad = per - features.shape[0]
    features = torch.cat([features, features.new_zeros(pad, features.shape[1])])
    targets = torch.cat([targets, targets.new_full((pad,), -1)])
    all_f = [torch.empty_like(features) for _ in range(size)]
    all_t = [torch.empty_like(targets) for _ in range(size)]
    dist.all_gather(all_f, features)
    dist.all_gather(all_t, targets)
    return (torch.stack(all_f, 1).reshape(per * size, -1)[:n], torch.stack(all_t, 1).reshape(-1)[:n])


# ---------------------------------------------------------------- cache
def feature_cache_key(ckpt: LoadedCheckpoint, *, dataset: str, root: str | os.PathLike, split: str,
                      fingerprint: str, transform: str, precision: str, read_as: dict | None = None) -> dict:
    """Everything that determines the features; its hash names the cache file."""
    return {"version": CACHE_VERSION, "checkpoint_sha256": ckpt.sha256, "layout": ckpt.layout,
            "read_as": read_as or {}, "dataset": dataset, "root": str(Path(root).resolve()),
            "split": split, "files_sha256": fingerprint, "transform": transform, "precision": precision}


def cached_features(model: nn.Module, ckpt: LoadedCheckpoint, ds: Dataset, *, dataset: str,
                    root: str | os.PathLike, split: str, transform: str, cache_dir: str | os.PathLike | None,
                    device: torch.device, batch_size: int = 256, num_workers: int | None = None,
                    read_as: dict | None = None, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features, labels, hit): read from ``cache_dir`` when present, else extract and store atomically.

    ``cache_dir`` empty or None disables the cache. ``precision``: the backbone's on a GPU (the
    key holds the effective one, so CPU features are fp32 whatever was asked).
    """
    precision = effective_precision(precision, device)
    key = feature_cache_key(ckpt, dataset=dataset, root=root, split=split, fingerprint=dataset_fingerprint(ds),
                            transform=transform, precision=precision, read_as=read_as)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"features-{split}-{digest[:20]}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        try:
            tensors = load_file(str(path))
            return tensors["features"], tensors["labels"], True
        except Exception:  # a foreign or damaged file under our name: recompute and replace it
            pass
    features, labels = extract_features(model, ds, batch_size=batch_size, num_workers=num_workers, device=device,
                                        precision=precision)
    if path is not None and world()[0] == 0:
        with atomic_path(path) as tmp:
            save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(tmp),
                      metadata={"key": json.dumps(key, sort_keys=True)})
    return features, labels, False
