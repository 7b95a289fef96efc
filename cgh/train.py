"""``cgh pretrain``: CGH (and its ablations, ReSSL included) pretraining on CPU, one GPU or many.

One process per device; under ``torchrun`` the global batch is split evenly over the processes,
gradients are averaged by DDP and the queues receive the keys of every process. GPU runs use bf16
autocast and channels_last. Everything the loop needs to continue exactly (model, teacher, queues,
optimizer, scaler, step, history, RNG states) is checkpointed atomically every few epochs, and
``--resume auto`` picks it up. The end of training exports the student backbone as the canonical
checkpoint ``backbone.safetensors`` and writes the ``pretrain`` result record.

Config sections (``PretrainConfig``): ``model``, ``loss``, ``data``, ``optim``, ``monitor``,
``run``; defaults are the authors' ImageNet ResNet-50 setup.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import MISSING
from torch.profiler import record_function
from torch.utils.data import DataLoader, Sampler

from cgh import distributed as D
from cgh.checkpointing import (find_resume_checkpoint, load_checkpoint, save_checkpoint,
                               set_rng_state)
from cgh.config import bounded, load_config, save_config, to_dict
from cgh.errors import CghError
from cgh.logging import LoaderWait, TrainingLogger, progress_bar
from cgh.records import RunTimer, write_record
from cgh.run_folder import claimed_run_folder, run_identity
from cgh.schedules import scaled_lr, teacher_momentum, warmup_cosine_lr

METHODS = ("cgh", "ressl", "cgh-same", "cgh-pred")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


# ------------------------------------------------------------------------------------ config
@dataclass
class ModelConfig:
    arch: str = "resnet50"                     # any torchvision ResNet of cgh.backbone.ARCHS
    layers: list[str] = field(default_factory=lambda: ["layer3", "layer4"])  # hypercolumn stages
    dim: int = bounded(512, ge=1)              # embedding size of both projectors
    hidden_dim: int = bounded(4096, ge=1)      # projector hidden width
    hyper_channels: int = bounded(0, ge=0)     # 1x1 conv width of the hypercolumn; 0 = pooled width
    queue_size: int = bounded(131072, ge=1)    # authors: 65536 * 2; multiple of the global batch
    predictor: bool = False                    # CGH-pred: predictor MLP on the student's global branch
    predictor_hidden: int = bounded(4096, ge=1)
    teacher_bn: str = "auto"                   # auto = shuffle under DDP, split on one process; or split|shuffle|plain
    bn_splits: int = bounded(8, ge=1)          # split-BN groups on one device (authors: 8)
    bn_split_order: str = "interleaved"        # split-BN groups: interleaved (authors: j, j+G, ...) | contiguous (blocks)
    sync_bn: bool = False                      # synchronise every plain BN over processes (off in the authors' code)


@dataclass
class LossConfig:
    mode: str = "cross"                        # cross (CGH) | same | global (= ReSSL)
    tau_s: float = bounded(0.1, gt=0)          # student global temperature
    tau_t: float = bounded(0.04, gt=0)         # teacher global temperature
    tau_h: float = bounded(0.08, gt=0)         # hypercolumn temperature (paper Table 6)
    schedule: str = "authors"                  # authors: 5-epoch InfoNCE warm-up, weights 0.5; paper: plain sum;
    #                                            ressl: ReSSL's own loss, weight 1, no warm-up (mode global only)
    warmup_epochs: float = bounded(5.0, ge=0)  # length of the authors' InfoNCE -> cross-context warm-up
    infonce_temperature: float = bounded(0.2, gt=0)


@dataclass
class DataConfig:
    dataset: str = "imagenet"                  # a name of cgh.data.datasets.build_classification_dataset
    root: str = MISSING
    split: str = "train"
    image_size: int = bounded(224, ge=1)       # teacher / main student view size
    crop_scale: list[float] = bounded(factory=lambda: [0.2, 1.0], gt=0, le=1)   # RandomResizedCrop area range
    multi_crop: bool = False                   # authors' multi-crop: 4 extra small student crops
    num_workers: int = -1                      # per process; -1 = one per CPU of this process's share (eval.features.default_num_workers)
    strict_images: bool = False                # corrupt image: false = skip and count, true = fatal
    gpu_augment: str = "auto"                  # student photometric aug on the device: auto (= on CUDA) | true | false


@dataclass
class OptimConfig:
    epochs: int = bounded(200, ge=1)
    batch_size: int = bounded(256, ge=1)       # global batch; split evenly over processes
    base_lr: float = bounded(0.05, gt=0)       # lr = base_lr * batch_size / 256
    final_lr: float = bounded(0.0, ge=0)
    weight_decay: float = bounded(1e-4, ge=0)
    # Parameters without weight decay (param_groups): bn_bias_names = name contains "bn" or "bias"
    # (authors' and ReSSL's ImageNet code; downsample and hypercolumn BN weights are decayed) |
    # norm_and_bias = every 1-D tensor | none = decay everything (authors' code on other datasets)
    weight_decay_exempt: str = "bn_bias_names"
    momentum: float = bounded(0.9, ge=0, le=1)
    warmup_epochs: float = bounded(5.0, ge=0)  # linear lr warm-up, then cosine
    warmup_start: str = "zero"                 # zero: step i at peak*i/W (authors, ReSSL) | one_step: peak*(i+1)/W
    teacher_momentum: float = bounded(0.999, ge=0, le=1)   # EMA momentum of the teacher
    momentum_schedule: str = "constant"        # constant (authors) | cosine (increase to 1)


@dataclass
class MonitorConfig:
    knn_every: int = bounded(10, ge=0)         # online kNN every N epochs (and at the end); 0 = off
    knn_dataset: str = ""                      # "" = data.dataset
    knn_root: str = ""                         # "" = data.root
    knn_train_split: str = "train"             # memory bank of the monitor
    knn_val_split: str = "val"                 # held-out split it is scored on
    knn_k: int = bounded(20, ge=1)
    knn_temperature: float = bounded(0.07, gt=0)
    knn_resize: int = bounded(256, ge=1)
    knn_crop: int = bounded(224, ge=1, le="knn_resize")
    knn_max_train: int = bounded(0, ge=0)      # 0 = whole split; else an evenly spaced subset (speed)
    positive_thresholds: list[float] = bounded(factory=lambda: [1e-3], ge=0, le=1)  # on teacher probabilities (Fig. 2)
    log_every: int = bounded(50, ge=1)         # steps between progress updates (host syncs)


@dataclass
class RunConfig:
    device: str = "auto"                       # auto | cpu | cuda
    precision: str = "bf16"                    # bf16 | fp16 | fp32; GPU only, CPU always computes in fp32
    channels_last: bool = True                 # GPU only
    compile: bool = False                      # torch.compile of the model and loss terms (on in the GPU configs; H100 R50 split-BN: 71 vs 153-195 ms per step)
    compile_mode: str = "default"              # its mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    tf32: bool = True                          # CUDA float32 matmuls (under bf16/fp16 autocast: the loss's similarities) on TF32 tensor cores, 10-bit mantissa like the authors' fp16; false = full float32
    seed: int = bounded(0, ge=0)
    deterministic: bool = False                # deterministic algorithms (exact resume on CPU holds either way)
    checkpoint_every: int = bounded(10, ge=1)  # epochs; the last epoch is always saved
    keep_last: int = bounded(0, ge=0)          # keep the newest N checkpoints; 0 = keep all
    progress: bool = True                      # tqdm bar on rank 0
    tensorboard: bool = True


@dataclass
class PretrainConfig:
    method: str = "cgh"                        # name recorded with the exported backbone
    output_dir: str = MISSING
    resume: str = ""                           # "" = fresh start; auto = newest complete checkpoint; or a path
    overwrite: bool = False                    # output_dir holds another run (or this one, not resumed): move it aside
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    run: RunConfig = field(default_factory=RunConfig)


class TrainingDivergedError(CghError):
    """The loss became NaN or infinite; training stopped without saving the broken state."""


# ------------------------------------------------------------------------------------ pieces
class GlobalBatchSampler(Sampler[list[int]]):
    """Per-process slices of one global permutation per epoch.

    Global batch ``j`` is ``perm[j*B:(j+1)*B]`` whatever the number of processes; process ``r`` of
    ``P`` takes its ``r``-th contiguous ``B/P`` slice. So the gathered batch (rank order) is the
    batch one process would see, and the queues fill identically. The permutation depends only on
    (seed, epoch), which makes the data order reproducible on resume. Incomplete batches dropped.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = num_samples, global_batch, rank, world, seed
        self.per_rank = global_batch // world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for j in range(len(self)):
            start = j * self.batch + self.rank * self.per_rank
            yield perm[start:start + self.per_rank]


WEIGHT_DECAY_EXEMPT = ("bn_bias_names", "norm_and_bias", "none")


def decay_exempt(name: str, param: torch.nn.Parameter, rule: str) -> bool:
    """Whether parameter ``name`` of the CGH model goes without weight decay under ``rule``
    (``optim.weight_decay_exempt``).

    ``bn_bias_names`` is the test of the authors' ``CGHModel`` (and ReSSL's ``ressl.py``):
    ``'bn' in name or 'bias' in name`` on the full parameter name. Their module names (``encoder_q``,
    ``fc``, ``hypercols_proj_q.reg_conv``) contain no "bn", and neither do ours (``student_backbone``,
    ``student_global_head``, ``student_hyper_head.reduce``): the backbone's ``bn1/2/3`` and every
    bias are exempt, while the ``downsample.1`` BatchNorm weights and the hypercolumn BatchNorm weight
    (``reduce.1.weight``, their ``reg_conv.1.weight``) are decayed. ``norm_and_bias``: every 1-D
    tensor (all BatchNorm parameters and biases). ``none``: nothing is exempt."""
    if rule == "bn_bias_names":
        return "bn" in name or "bias" in name
    if rule == "norm_and_bias":
        return param.ndim <= 1
    if rule == "none":
        return False
    raise CghError(f"optim.weight_decay_exempt '{rule}' unknown; expected one of {', '.join(WEIGHT_DECAY_EXEMPT)}")


def param_groups(model: torch.nn.Module, weight_decay: float, exempt: str = "bn_bias_names") -> list[dict]:
    """SGD parameter groups of the trainable parameters: weight decay, except those ``exempt``
    names (``decay_exempt``). The teacher has no trainable parameters; empty groups are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if decay_exempt(name, p, exempt) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_model(cfg: PretrainConfig, world: int, device: torch.device):
    """The CGH model for this config, with the teacher BatchNorm mode resolved for ``world`` processes."""
    from cgh.model import CGHModel

    teacher_bn = cfg.model.teacher_bn
    if teacher_bn == "auto":
        teacher_bn = "shuffle" if world > 1 else "split"
    if teacher_bn == "split" and cfg.model.bn_splits > 1 and (cfg.optim.batch_size // world) % cfg.model.bn_splits:
        raise CghError(f"split BatchNorm needs the per-process batch ({cfg.optim.batch_size // world}) to be "
                       f"divisible by model.bn_splits ({cfg.model.bn_splits})")
    model = CGHModel(arch=cfg.model.arch, layers=tuple(cfg.model.layers), dim=cfg.model.dim,
                     hidden_dim=cfg.model.hidden_dim, hyper_channels=cfg.model.hyper_channels or None,
                     queue_size=cfg.model.queue_size, predictor=cfg.model.predictor,
                     predictor_hidden=cfg.model.predictor_hidden, teacher_bn=teacher_bn,
                     bn_splits=cfg.model.bn_splits, use_hypercolumn=cfg.loss.mode != "global",
                     bn_split_order=cfg.model.bn_split_order)
    if cfg.model.sync_bn and world > 1:
        model = D.convert_sync_batchnorm(model, device)
    model.to(device)
    if device.type == "cuda" and cfg.run.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(core: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """DDP over processes (gradient averaging overlapped with backward); the model itself on one."""
    if world == 1:
        return core
    # Buffers (queues, BN statistics) are never broadcast: the queues are identical on every rank
    # by construction, and broadcasting 2 x K x dim floats each step would dominate the step time.
    return torch.nn.parallel.DistributedDataParallel(
        core, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def check_config(cfg: PretrainConfig, world: int) -> None:
    """Fail before any data is read when the config cannot work."""
    from cgh.batchnorm import check_split_order
    from cgh.losses import MODES, SCHEDULES
    from cgh.model import CGHModel, check_layers
    from cgh.schedules import WARMUP_STARTS
    from eval.features import resolve_num_workers

    b = cfg.optim.batch_size
    if b <= 0 or b % world:
        raise CghError(f"optim.batch_size ({b}) must be a positive multiple of the number of processes ({world})")
    CGHModel.validate_queue(cfg.model.queue_size, b)
    check_layers(cfg.model.layers)
    if cfg.loss.mode not in MODES:
        raise CghError(f"loss.mode '{cfg.loss.mode}' unknown; expected one of {', '.join(MODES)}")
    if cfg.loss.schedule not in SCHEDULES:
        raise CghError(f"loss.schedule '{cfg.loss.schedule}' unknown; expected one of {', '.join(SCHEDULES)}")
    if cfg.loss.schedule == "ressl" and cfg.loss.mode != "global":
        raise CghError(f"loss.schedule 'ressl' is ReSSL's objective and needs loss.mode=global "
                       f"(got '{cfg.loss.mode}')")
    if cfg.optim.weight_decay_exempt not in WEIGHT_DECAY_EXEMPT:
        raise CghError(f"optim.weight_decay_exempt '{cfg.optim.weight_decay_exempt}' unknown; expected one of "
                       f"{', '.join(WEIGHT_DECAY_EXEMPT)}")
    if cfg.optim.warmup_start not in WARMUP_STARTS:
        raise CghError(f"optim.warmup_start '{cfg.optim.warmup_start}' unknown; expected one of "
                       f"{', '.join(WARMUP_STARTS)}")
    check_split_order(cfg.model.bn_split_order)
    if cfg.run.precision not in ("bf16", "fp16", "fp32"):
        raise CghError(f"run.precision '{cfg.run.precision}' unknown; expected bf16, fp16 or fp32")
    if cfg.run.compile_mode not in COMPILE_MODES:
        raise CghError(f"run.compile_mode '{cfg.run.compile_mode}' unknown; expected one of {', '.join(COMPILE_MODES)}")
    if cfg.optim.momentum_schedule not in ("constant", "cosine"):
        raise CghError(f"optim.momentum_schedule '{cfg.optim.momentum_schedule}' unknown; expected constant or cosine")
    if cfg.optim.epochs < 1:
        raise CghError(f"optim.epochs must be >= 1 (got {cfg.optim.epochs})")
    resolve_num_workers(cfg.data.num_workers)


def resolve_gpu_augment(cfg: DataConfig, device: torch.device) -> bool:
    """Whether the photometric augmentation runs on the device: ``auto`` turns it on with CUDA,
    where the workers' PIL pipeline cannot keep up with the step."""
    value = str(cfg.gpu_augment).lower()   # a YAML/CLI boolean arrives as "True" / "False"
    if value not in ("auto", "true", "false"):
        raise CghError(f"data.gpu_augment '{cfg.gpu_augment}' unknown; expected auto, true or false")
    return value == "true" or (value == "auto" and device.type == "cuda")


def build_transform(cfg: DataConfig, gpu_augment: bool = False):
    from cgh.transforms import MultiCropTransform, TwoViewTransform

    cls = MultiCropTransform if cfg.multi_crop else TwoViewTransform
    return cls(cfg.image_size, tuple(cfg.crop_scale), gpu_augment=gpu_augment)


def build_gpu_augment(cfg: DataConfig, device: torch.device):
    """The device half of ``build_transform(cfg, gpu_augment=True)``."""
    from cgh.gpu_augment import PhotometricAugment
    from cgh.transforms import IMAGENET_MEAN, IMAGENET_STD, blur_sigma

    return PhotometricAugment(blur_sigma(cfg.image_size)[1], IMAGENET_MEAN, IMAGENET_STD, device)


def build_dataset(cfg: PretrainConfig, gpu_augment: bool = False):
    from cgh.data.datasets import build_classification_dataset
    from cgh.data.pretrain_dataset import PretrainDataset

    base = build_classification_dataset(cfg.data.dataset, cfg.data.root, cfg.data.split, None)
    if len(base) < cfg.optim.batch_size:
        raise CghError(f"{cfg.data.dataset} split '{cfg.data.split}' at {cfg.data.root} has {len(base)} images, "
                       f"fewer than one global batch ({cfg.optim.batch_size})")
    return PretrainDataset(base, build_transform(cfg.data, gpu_augment), strict_images=cfg.data.strict_images,
                           tensor_images=gpu_augment)


def train_config_summary(cfg: PretrainConfig) -> dict:
    """The compact description stored in the exported backbone's sidecar (read by reports)."""
    return {"method": cfg.method, "loss_mode": cfg.loss.mode, "layers": list(cfg.model.layers),
            "tau_s": cfg.loss.tau_s, "tau_t": cfg.loss.tau_t, "tau_h": cfg.loss.tau_h,
            "loss_schedule": cfg.loss.schedule, "multi_crop": cfg.data.multi_crop,
            "predictor": cfg.model.predictor, "epochs": cfg.optim.epochs, "dataset": cfg.data.dataset,
            "arch": cfg.model.arch, "batch_size": cfg.optim.batch_size, "queue_size": cfg.model.queue_size}


class KnnMonitor:
    """Online kNN top-1 of the student backbone on a held-out split (features via eval.features)."""

    def __init__(self, cfg: PretrainConfig, device: torch.device):
        from cgh.data.pretrain_dataset import SkipCorruptDataset
        from eval.features import build_split, eval_transform, resolve_num_workers

        m = cfg.monitor
        name, root = m.knn_dataset or cfg.data.dataset, m.knn_root or cfg.data.root
        tf, _ = eval_transform(m.knn_resize, m.knn_crop)
        strict = cfg.data.strict_images
        self.train = SkipCorruptDataset(build_split(name, root, m.knn_train_split, None), tf, strict)
        self.num_classes = len(self.train.classes) or None
        if m.knn_max_train and len(self.train) > m.knn_max_train:
            step = len(self.train) / m.knn_max_train
            self.train = torch.utils.data.Subset(self.train, [int(i * step) for i in range(m.knn_max_train)])
        self.val = SkipCorruptDataset(build_split(name, root, m.knn_val_split, None), tf, strict)
        self.k = min(m.knn_k, len(self.train))
        self.temperature = m.knn_temperature
        self.workers = resolve_num_workers(cfg.data.num_workers)
        self.device = device

    def __call__(self, backbone: torch.nn.Module) -> float:
        from eval.features import extract_features
        from eval.knn import weighted_knn

        train_f, train_y = extract_features(backbone, self.train, num_workers=self.workers, device=self.device)
        val_f, val_y = extract_features(backbone, self.val, num_workers=self.workers, device=self.device)
        backbone.train()
        num_classes = self.num_classes or int(max(train_y.max(), val_y.max())) + 1
        scores = weighted_knn(train_f, train_y, val_f, num_classes, ks=(self.k,), temperature=self.temperature)
        return 100.0 * (scores[self.k].argmax(1) == val_y).float().mean().item()


# ------------------------------------------------------------------------------------ the step
def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32,
                          enabled=device.type == "cuda" and dtype is not None)


def views_on_device(student_views, teacher_view, device: torch.device, augment=None):
    """A batch's views on the device, ready for the model; with ``augment`` (a
    ``PhotometricAugment``) they arrive as uint8 images (+ parameters) and are finished there."""
    if augment is None:
        return [v.to(device, non_blocking=True) for v in student_views], teacher_view.to(device, non_blocking=True)
    students = [augment.student(images.to(device, non_blocking=True), params.to(device, non_blocking=True))
                for images, params in student_views]
    return students, augment.teacher(teacher_view.to(device, non_blocking=True))


def train_step(model, core, batch, optimizer, scaler, cfg: PretrainConfig, step: int, total_steps: int,
               steps_per_epoch: int, device: torch.device, peak_lr: float, augment=None) -> tuple[dict, dict]:
    """One optimisation step; returns (loss dict, model outputs). No host synchronisation.

    ``model`` is what runs the forward pass (DDP wrapper or the model itself), ``core`` the
    underlying ``CGHModel`` (teacher update). The teacher is updated before its forward pass.
    ``augment``: the ``PhotometricAugment`` that finishes the views when ``data.gpu_augment`` is on.
    The ``cgh.*`` profiler ranges split the step's device time by phase
    (``benchmarks/pretrain_step.py --profile``).
    """
    from cgh.losses import cgh_loss

    (student_views, teacher_view), labels, indices = batch[0], batch[1], batch[2]
    mf = torch.channels_last if device.type == "cuda" and cfg.run.channels_last else torch.contiguous_format
    student_views, teacher_view = views_on_device(student_views, teacher_view, device, augment)
    student_views = [v.contiguous(memory_format=mf) for v in student_views]
    teacher_view = teacher_view.contiguous(memory_format=mf)
    labels = labels.to(device, non_blocking=True)
    indices = indices.to(device, non_blocking=True)

    lr = warmup_cosine_lr(step, total_steps, round(cfg.optim.warmup_epochs * steps_per_epoch), peak_lr,
                          cfg.optim.final_lr, cfg.optim.warmup_start)
    for group in optimizer.param_groups:
        group["lr"] = lr
    momentum = teacher_momentum(step, total_steps, cfg.optim.teacher_momentum, cfg.optim.momentum_schedule)
    with record_function("cgh.teacher_ema"):
        core.update_teacher(momentum)
    with record_function("cgh.forward"), autocast(device, cfg.run.precision):
        out = model(student_views, teacher_view, labels, indices)
    with record_function("cgh.loss"):
        loss = cgh_loss(out, mode=cfg.loss.mode, tau_s=cfg.loss.tau_s, tau_t=cfg.loss.tau_t, tau_h=cfg.loss.tau_h,
                        schedule=cfg.loss.schedule, step=step,
                        warmup_steps=round(cfg.loss.warmup_epochs * steps_per_epoch),
                        infonce_temperature=cfg.loss.infonce_temperature, compiled=cfg.run.compile)
    optimizer.zero_grad(set_to_none=True)
    with record_function("cgh.backward"):
        scaler.scale(loss["total"]).backward()
    with record_function("cgh.optimizer"):
        scaler.step(optimizer)
        scaler.update()
    loss["lr"], loss["momentum"] = lr, momentum
    return loss, out


def selection_inputs(out: dict, cfg: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The teacher distribution the student learns its global context from (paper Fig. 2):
    hypercolumn (tau_h) for CGH, global (tau_t) for ReSSL / the global-context ablation."""
    if out.get("teacher_hyper") is not None and cfg.loss.mode == "cross":
        return out["teacher_hyper"], out["queue_hyper"], cfg.loss.tau_h
    return out["teacher_global"], out["queue_global"], cfg.loss.tau_t


# ------------------------------------------------------------------------------------ the loop
def setup_determinism(cfg: PretrainConfig, rank: int) -> None:
    import random

    import numpy as np

    seed = cfg.run.seed * 1000 + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def setup_tf32(run: RunConfig) -> None:
    """``run.tf32``: whether CUDA float32 matmuls may use TF32. Under autocast these are the
    loss's ``[B, D] x [D, K]`` similarity products, which otherwise run as float32 SIMT GEMMs
    (4.3 ms per compiled R50 step on an H100; 0.9 ms in TF32). TF32 rounds their inputs to 10
    mantissa bits, as the authors' fp16 autocast did; on the CPU the flag changes nothing."""
    torch.backends.cuda.matmul.allow_tf32 = run.tf32


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining; return the path of the exported canonical backbone checkpoint."""
    timer = RunTimer()
    device = D.init_distributed(cfg.run.device)
    world, rank = D.world_size(), D.rank()
    # The folder is bound to these settings; without --resume, this run's own old checkpoints there
    # are refused too (starting over beside them would let a later resume mix the two runs).
    identity = run_identity("pretrain", None, to_dict(cfg))
    fresh_if = () if cfg.resume else ("checkpoints",)
    try:
        with claimed_run_folder(cfg.output_dir, identity, overwrite=cfg.overwrite, main=rank == 0,
                                fresh_if=fresh_if):
            return _pretrain(cfg, device, world, rank, timer)
    finally:
        D.cleanup()


def _pretrain(cfg: PretrainConfig, device: torch.device, world: int, rank: int, timer: RunTimer) -> Path:
    from eval.features import resolve_num_workers

    check_config(cfg, world)
    gpu_augment = resolve_gpu_augment(cfg.data, device)
    out_dir = Path(cfg.output_dir)
    main = rank == 0
    if main:
        save_config(cfg, out_dir)

    # Model first (its init draws from the seeded RNG), then data.
    setup_determinism(cfg, 0)   # identical initial weights and queues on every process
    setup_tf32(cfg.run)
    core = build_model(cfg, world, device)
    setup_determinism(cfg, rank)  # then a different augmentation stream per process
    dataset = build_dataset(cfg, gpu_augment)
    augment = build_gpu_augment(cfg.data, device) if gpu_augment else None
    monitor = KnnMonitor(cfg, device) if cfg.monitor.knn_every > 0 else None

    model = wrap_ddp(core, world, device)
    if cfg.run.compile:
        core.compile(mode=cfg.run.compile_mode)
    optimizer = torch.optim.SGD(param_groups(core, cfg.optim.weight_decay, cfg.optim.weight_decay_exempt),
                                lr=0.0, momentum=cfg.optim.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.run.precision == "fp16")

    sampler = GlobalBatchSampler(len(dataset), cfg.optim.batch_size, rank, world, cfg.run.seed)
    steps_per_epoch = len(sampler)
    total_steps = cfg.optim.epochs * steps_per_epoch
    peak_lr = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size)
    thresholds = list(cfg.monitor.positive_thresholds)

    # Resume: rank 0 decides which checkpoint, every rank loads it (and its own RNG state).
    start_epoch, history, skipped_total, resumed_from = 0, [], 0, None
    ckpt_path = D.broadcast_object(find_resume_checkpoint(out_dir, cfg.resume) if main else None)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, rank)
        if state.get("world_size", world) != world:
            raise CghError(f"{ckpt_path} was written by {state['world_size']} processes, this run has {world}; "
                           f"exact resume needs the same number")
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        skipped_total = int(state.get("skipped_images", 0))
        set_rng_state(state["rng"])
        resumed_from = str(ckpt_path)
        if main:
            print(f"cgh pretrain: resumed from {ckpt_path} (epoch {start_epoch}/{cfg.optim.epochs})", flush=True)
        del state

    logger = TrainingLogger(out_dir, enabled=main, history=history, purge_step=start_epoch * steps_per_epoch,
                            tensorboard=cfg.run.tensorboard)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=resolve_num_workers(cfg.data.num_workers),
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator())
    last_ckpt = resumed_from
    core.train()
    try:
        for epoch in range(start_epoch, cfg.optim.epochs):
            sampler.set_epoch(epoch)
            # worker augmentation seeds follow (seed, epoch, rank), not the state of the main RNG
            loader.generator.manual_seed(cfg.run.seed * 100003 + epoch * world + rank)
            row = _train_epoch(model, core, loader, optimizer, scaler, cfg, epoch, steps_per_epoch, total_steps,
                               device, peak_lr, thresholds, logger, last_ckpt, augment)
            skipped_total += int(row["skipped_images"])
            row["skipped_images_total"] = skipped_total
            last = epoch + 1 == cfg.optim.epochs
            if monitor is not None and ((epoch + 1) % cfg.monitor.knn_every == 0 or last):
                row["knn_top1"] = monitor(core.student_backbone)
            row["wall_time_s"] = round(timer.elapsed, 3)
            logger.end_epoch(row, (epoch + 1) * steps_per_epoch)
            if main and cfg.run.progress:
                print("cgh pretrain: " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
            if (epoch + 1) % max(1, cfg.run.checkpoint_every) == 0 or last:
                last_ckpt = _save(out_dir, epoch + 1, core, optimizer, scaler, logger.history, skipped_total,
                                  cfg, rank, world) or last_ckpt
    finally:
        logger.close()
    path = None
    if main:
        path = _export(cfg, core, out_dir, logger.history, skipped_total, timer, last_ckpt)
    D.barrier()
    return D.broadcast_object(path)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _train_epoch(model, core, loader, optimizer, scaler, cfg, epoch, steps_per_epoch, total_steps, device,
                 peak_lr, thresholds, logger, last_ckpt, augment) -> dict:
    """One epoch; loss terms are summed on the device and read at ``log_every`` steps and at the end."""
    from eval.metrics import effective_rank
    from eval.positive_selection import precision_recall, selection_counts, teacher_distribution

    main = D.is_main()
    bar = progress_bar(steps_per_epoch, epoch, cfg.optim.epochs, main and cfg.run.progress)
    sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), device=device, dtype=torch.bool)
    pos_counts = torch.zeros(len(thresholds), 3, device=device, dtype=torch.float64)
    skipped = 0  # counted on the host: the count arrives with the batch, reading it costs no sync
    n_steps, images, t0 = 0, 0, time.perf_counter()
    log_every = max(1, cfg.monitor.log_every)
    scalars = {}
    waiting = LoaderWait(loader)
    for i, batch in enumerate(waiting):
        step = epoch * steps_per_epoch + i
        loss, out = train_step(model, core, batch, optimizer, scaler, cfg, step, total_steps, steps_per_epoch,
                               device, peak_lr, augment)
        bad |= ~torch.isfinite(loss["total"].detach())
        for k, v in loss.items():
            if isinstance(v, torch.Tensor):
                sums[k] = sums.get(k, 0) + v.detach().float()
        scalars = {"lr": loss["lr"], "momentum": loss["momentum"], "w_cross": loss["w_cross"],
                   "w_infonce": loss["w_infonce"]}
        skipped += int(batch[3].sum())
        n_steps += 1
        images += batch[1].shape[0] * D.world_size()
        if thresholds and (i % log_every == 0 or i + 1 == steps_per_epoch):
            with torch.no_grad():
                teacher, queue, tau = selection_inputs(out, cfg)
                probs = teacher_distribution(teacher, queue, tau)
                pos_counts += selection_counts(probs, out["queue_labels"], out["batch_labels"], thresholds)
        del out
        if (i + 1) % log_every == 0:
            if bool(bad):  # the one host sync of a logging interval
                raise _diverged(epoch, step, last_ckpt)
            seconds = time.perf_counter() - t0
            rate, wait = images / seconds, waiting.seconds / seconds
            cur = {k: float(v) / n_steps for k, v in sums.items()}
            bar.set_postfix(loss=f"{cur['total']:.4f}", img_s=f"{rate:.0f}", data_wait=f"{wait:.0%}",
                            lr=f"{loss['lr']:.3g}")
            logger.scalars(step, {**{("loss" if k == "total" else k): v for k, v in cur.items()}, **scalars,
                                  "img_per_s": rate, "data_wait": wait})
        bar.update(1)
    bar.close()
    # one reduction of everything this epoch accumulated
    keys = sorted(sums)
    packed = torch.cat([torch.stack([sums[k].double() for k in keys] + [bad.double()]),
                        torch.tensor([float(skipped)], dtype=torch.float64, device=device),
                        pos_counts.flatten()])
    D.all_reduce_sum(packed)
    world = D.world_size()
    if packed[len(keys)] > 0:
        raise _diverged(epoch, epoch * steps_per_epoch + n_steps - 1, last_ckpt)
    means = {k: packed[j].item() / (n_steps * world) for j, k in enumerate(keys)}
    row = {"epoch": epoch + 1, "loss": means.pop("total")}
    row.update(means)
    row.update(scalars)
    elapsed = time.perf_counter() - t0
    row["img_per_s"] = round(images / elapsed, 2) if elapsed > 0 else None
    row["data_wait"] = round(waiting.seconds / elapsed, 4) if elapsed > 0 else None   # share of the epoch
    row["skipped_images"] = int(packed[len(keys) + 1].item())
    # Collapse check (once per epoch): how many directions the teacher's keys in the queues use.
    # The queues are identical on every process and only rank 0 logs, so only rank 0 computes it.
    if main:
        row["queue_rank_global"] = effective_rank(core.queue.global_keys)
        if core.queue.hyper_keys is not None:
            row["queue_rank_hyper"] = effective_rank(core.queue.hyper_keys)
    counts = packed[len(keys) + 2:].view(len(thresholds), 3) if thresholds else None
    if thresholds:
        for t, (p, r) in zip(thresholds, precision_recall(counts)):
            suffix = "" if t == thresholds[0] else f"@{t:g}"
            row[f"pos_precision{suffix}"], row[f"pos_recall{suffix}"] = p, r
    return row


def _diverged(epoch: int, step: int, last_ckpt) -> TrainingDivergedError:
    where = f"the last good checkpoint {last_ckpt} is kept" if last_ckpt else "no checkpoint was written yet"
    return TrainingDivergedError(f"loss became NaN or Inf in epoch {epoch + 1} (by step {step}); training "
                                 f"stopped and nothing was saved from this epoch; {where}. Lower optim.base_lr, "
                                 f"use run.precision=fp32, or check the data")


def _save(out_dir, epoch, core, optimizer, scaler, history, skipped_total, cfg, rank, world):
    """Ranks > 0 write their RNG state first; rank 0's file (the completeness marker) comes last."""
    state = None
    if rank == 0:
        state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "history": history, "skipped_images": skipped_total, "config": to_dict(cfg)}
    if rank != 0:
        save_checkpoint(out_dir, epoch, {}, rank=rank, world_size=world)
    D.barrier()
    path = None
    if rank == 0:
        path = save_checkpoint(out_dir, epoch, state, rank=0, world_size=world, keep_last=cfg.run.keep_last)
    D.barrier()
    return str(path) if path else None


def _export(cfg, core, out_dir: Path, history: list[dict], skipped_total: int, timer: RunTimer,
            last_ckpt: str | None) -> Path:
    """Canonical backbone + ``result.json`` (protocol "pretrain")."""
    from cgh.backbone import backbone_state_dict
    from cgh.canonical import save_canonical
    from cgh.io import sha256_file
    from transfer.hub import load_backbone

    path = save_canonical(backbone_state_dict(core.student_backbone), out_dir / "backbone.safetensors",
                          method=cfg.method, arch=cfg.model.arch,
                          source_sha256=sha256_file(last_ckpt) if last_ckpt else None,
                          train_config=train_config_summary(cfg), epoch=cfg.optim.epochs)
    last = history[-1] if history else {}
    knn = [h["knn_top1"] for h in history if h.get("knn_top1") is not None]
    positive = {k: v for k, v in last.items() if k.startswith("pos_")}
    selection = {}
    for t in cfg.monitor.positive_thresholds:
        suffix = "" if t == cfg.monitor.positive_thresholds[0] else f"@{t:g}"
        selection[f"{t:g}"] = {"precision": last.get(f"pos_precision{suffix}"),
                               "recall": last.get(f"pos_recall{suffix}")}
    metrics = {"loss": last.get("loss"), "knn_top1": knn[-1] if knn else None, **positive}
    write_record(out_dir, protocol="pretrain", checkpoint=load_backbone(path).identity(),
                 dataset={"name": cfg.data.dataset, "root": str(cfg.data.root), "split": cfg.data.split},
                 metrics=metrics, config=to_dict(cfg), started=timer.started, wall_time_s=timer.elapsed,
                 extra={"history": history, "positive_selection": selection,
                        "skipped_images": skipped_total, "last_checkpoint": last_ckpt,
                        "world_size": D.world_size()})
    return path


# ------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="pretraining config (path, or name under configs/, e.g. pretrain/demo_synth)")
    parser.add_argument("--resume", default=None,
                        help="'auto' = continue from the newest complete checkpoint in output_dir; or a path")
    parser.add_argument("--output-dir", default=None, help="shortcut for output_dir=...")
    parser.add_argument("--overwrite", action="store_true",
                        help="the output folder holds another run (or this one, not resumed): move it aside "
                        "and start fresh (= overwrite=true)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.epochs=10")


def load_pretrain_config(config: str, overrides=()) -> PretrainConfig:
    return load_config(PretrainConfig, config, list(overrides))


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.overwrite:
        overrides.append("overwrite=true")
    cfg = load_pretrain_config(args.config, overrides)
    path = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0 and path is not None:
        print(f"cgh pretrain: exported {path}")
    return 0
