"""Semi-supervised evaluation: fine-tune the whole network on a labelled subset (SimCLR 1% / 10%).

The subset is a SimCLR-format list of file basenames: the packaged ImageNet lists ("1percent",
"10percent", sha256-verified by ``cgh.data.subsets``), synthshapes' own lists, or any file. Every
listed image must exist in the train split.

Two recipes ship as configs, and they differ: the paper's text (Sec. 4.3: 50 epochs, head lr 0.5 /
0.2, backbone lr 1e-4 / 2e-4 for 1 % / 10 %, x0.1 at 30 and 40; configs/eval/semi_*_paper.yaml)
and the authors' released script (eval_semisup.py in zaczgao/Cross-Context_Learning, SwAV style:
70 epochs, head lr 0.02, backbone lr 0.005, x0.1 at 30 and 60, for both subsets;
semi_*_authors.yaml, and this file's defaults). Neither the paper nor the repository says which
one produced Table 3, so every record names its recipe (``extra.recipe``).

What the script does beyond the recipe, and these defaults follow: fp32 forward passes, the fc
layer keeps torchvision's own init (``head_init``), normalisation std [0.228, 0.224, 0.225]
(``normalize_std``), the last partial batch is kept (``drop_last``), BatchNorm synchronised across
GPUs (SyncBN) and validation after every epoch, reporting the best epoch (the record holds the
last and the best). The paper states none of these; its configs use the script's values.
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
from cgh.config import ConfigError, bounded
from cgh.data.subsets import SUBSET_SHA256, load_subset, subset_indices
from cgh.errors import DatasetError
from cgh.records import RunTimer
from eval.features import (ProtocolConfig, build_split, check_choices, check_protocol_config, check_same_classes,
                           effective_precision, open_checkpoint, protocol_transforms, select_device, workers, world,
                           write_result)
from eval.linear import HEAD_INITS, new_head
from eval.training import REPORTED_EPOCHS, best_and_last, fit, flag_divergence, step_factor

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
    # The classifier's init: "torchvision" = nn.Linear's default, which eval_semisup.py's
    # torchvision resnet50(num_classes=1000) fc keeps; "normal" = N(0, 0.01), bias 0 (MoCo's probe).
    head_init: str = "torchvision"
    # Normalisation std of both transforms: eval_semisup.py (from SwAV) uses 0.228 for red;
    # ImageNet's is [0.229, 0.224, 0.225].
    normalize_std: list[float] = bounded(factory=lambda: [0.228, 0.224, 0.225], gt=0)
    # eval_semisup.py's train loader keeps each epoch's last partial batch (DataLoader default).
    drop_last: bool = False
    # Which epoch a paper table shows; the record holds both. "best": eval_semisup.py logs best_acc.
    reported_epoch: str = "best"


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


def sync_batchnorm(model: nn.Module, device: torch.device, processes: int,
                   log=lambda msg: None) -> tuple[nn.Module, str]:
    """(model, "sync" | "per-process"): SyncBN across processes on GPUs, as eval_semisup.py
    converts its model (``nn.SyncBatchNorm.convert_sync_batchnorm``; same parameters and state-dict
    keys). SyncBN runs on CUDA only, so CPU processes (gloo) keep per-process BN, and say so."""
    if processes <= 1:
        return model, "per-process"
    if device.type != "cuda":
        log(f"{processes} CPU processes: BatchNorm stays per-process (SyncBatchNorm runs on CUDA only)")
        return model, "per-process"
    return nn.SyncBatchNorm.convert_sync_batchnorm(model), "sync"


def run(cfg: Config) -> Path:
    timer = RunTimer()
    check_protocol_config(cfg)
    check_choices(cfg, head_init=HEAD_INITS, reported_epoch=REPORTED_EPOCHS)
    if len(cfg.normalize_std) != 3:
        raise ConfigError(f"config key 'normalize_std' needs 3 values (R, G, B), got {list(cfg.normalize_std)}")
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    backbone, ckpt = open_checkpoint(cfg)
    train_tf, eval_tf, _ = protocol_transforms(cfg)      # normalised with cfg.normalize_std
    where = f"{cfg.dataset} at {cfg.data_root}"
    names = load_subset(cfg.subset, dataset=cfg.dataset, root=cfg.data_root)
    full_train = build_split(cfg.dataset, cfg.data_root, cfg.train_split, train_tf)
    val_ds = build_split(cfg.dataset, cfg.data_root, cfg.val_split, eval_tf)
    classes = check_same_classes(full_train, val_ds, where)
    train_ds = labelled_subset(full_train, names, where)
    used = [os.path.basename(full_train.samples[i][0]) for i in train_ds.indices]
    model = nn.Sequential(backbone, new_head(feature_dim(ckpt.arch), len(classes), cfg.head_init))
    model, batchnorm = sync_batchnorm(model, device, world()[1], _log)
    # Separate learning rates: the new head learns fast, the pretrained backbone is only nudged.
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": cfg.backbone_lr},
                                 {"params": model[1].parameters(), "lr": cfg.head_lr}],
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    out = Path(cfg.output_dir)
    identity = {"checkpoint_sha256": ckpt.sha256, "arch": ckpt.arch, "num_classes": len(classes),
                "dataset": cfg.dataset, "subset_sha256": names_sha256(names), "epochs": cfg.epochs,
                "backbone_lr": cfg.backbone_lr, "head_lr": cfg.head_lr, "batch_size": cfg.batch_size,
                "seed": cfg.seed, "head_init": cfg.head_init, "normalize_std": list(cfg.normalize_std),
                "drop_last": bool(cfg.drop_last), "backbone_precision": cfg.backbone_precision}
    milestones = list(cfg.milestones)
    # MultiStepLR stepped once per epoch in eval_semisup.py: the factor of the iteration's epoch
    history = fit(model, train_ds, optimizer=optimizer,
                  lr_factor=lambda step, per_epoch: step_factor(step // per_epoch, milestones, cfg.gamma),
                  epochs=cfg.epochs, batch_size=cfg.batch_size, num_workers=workers(cfg), device=device,
                  state_module=model, state_path=out / STATE_NAME, identity=identity, val_ds=val_ds, seed=cfg.seed,
                  precision=cfg.backbone_precision, drop_last=bool(cfg.drop_last), log=_log)
    metrics = best_and_last(history)
    extra = {"recipe": cfg.recipe, "num_labelled": len(used), "num_val": len(val_ds),
             "num_classes": len(classes), "labelled_files_sha256": names_sha256(used),
             "precision": effective_precision(cfg.backbone_precision, device), "batchnorm": batchnorm,
             "reported_epoch": cfg.reported_epoch, "history": history}
    flag_divergence(extra, history, _log)
    return write_result(cfg, protocol="semi", checkpoint=ckpt.identity(),
                        dataset={"name": cfg.dataset, "root": str(cfg.data_root), "split": cfg.val_split,
                                 "train_split": cfg.train_split, "subset": subset_label(cfg.subset)},
                        metrics=metrics, started=timer.started, wall_time_s=timer.elapsed, extra=extra)


def _log(msg: str) -> None:
    if world()[0] == 0:
        print(f"[semi] {msg}", flush=True)
