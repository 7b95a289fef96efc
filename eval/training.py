"""The supervised loop shared by the linear probe and semi-supervised fine-tuning.

One job: train a classifier for some epochs with a learning-rate factor that is a pure function of
the global iteration, validate top-1/top-5 after every epoch (as the authors' eval_lincls.py and
eval_semisup.py do, so a record can carry the last and the best epoch), and survive interruption.
The run's state (trainable tensors, optimizer, finished epochs, the per-epoch history with its
validation accuracies) is saved atomically after every epoch and reloaded with
``weights_only=True``; each epoch's data order and augmentation come from seeds derived from (seed,
epoch), so a resumed run sees the same batches and learning rates an uninterrupted one would have.
Under ``torch.distributed`` the model is wrapped in DDP, the global batch is split over processes
and accuracy counts are summed over them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from cgh.errors import CghError
from cgh.io import atomic_path
from eval.features import autocast, world
from eval.metrics import topk_correct

SCHEDULE_STEPS = ("iteration", "epoch")
REPORTED_EPOCHS = ("best", "last")


def cosine_factor(t: int, total: int) -> float:
    """Cosine decay from 1 towards 0: ``0.5 (1 + cos(pi t / total))`` at step ``t`` of ``total``.

    Per iteration (t = global iteration, total = epochs x iterations per epoch: the authors'
    eval_lincls.py, schedule "cos" of their models/base_model.py; ReSSL's linear_eval.py) or per
    epoch (t = epoch, total = epochs: base_model.py's "cos_epoch").
    """
    return 0.5 * (1.0 + math.cos(math.pi * t / total))


def step_factor(epoch: int, milestones: list[int], gamma: float = 0.1) -> float:
    """x ``gamma`` at each milestone epoch (the semi-supervised recipes: 30/40 or 30/60)."""
    return gamma ** sum(epoch >= m for m in milestones)


def divergence(history: list[dict]) -> str | None:
    """Why a classifier's per-epoch loss says its training diverged, or None.

    Diverged: a non-finite loss, or a loss that grew by orders of magnitude, i.e. an epoch 100x the
    first epoch's loss, or a last epoch 10x above it (seen: ~100 rising to 1e7 on a weak backbone,
    top-1 at chance). A loss that is merely high is not flagged: unnormalised features at the small
    datasets' lr 3.0 start in the hundreds and still learn (synthshapes: 425 -> 50, top-1 50 %).
    """
    first = history[0]["loss"] if history else None
    for row in history:
        loss = row["loss"]
        if not math.isfinite(loss):
            return f"training diverged: the loss became {loss} in epoch {row['epoch']}; lower the learning rate"
        if loss >= 100 * first:
            return (f"training diverged: the mean loss grew from {first:.3g} (epoch 1) to {loss:.3g} "
                    f"(epoch {row['epoch']}); lower the learning rate")
    if history and history[-1]["loss"] >= 10 * first:
        return (f"training diverged: the mean loss ended at {history[-1]['loss']:.3g}, 10x above epoch 1's "
                f"{first:.3g}; lower the learning rate")
    return None


def flag_divergence(extra: dict, history: list[dict], log: Callable[[str], None]) -> None:
    """Put ``divergence``'s reason into a record's ``extra["diverged"]`` (reports flag it) and warn."""
    reason = divergence(history)
    if reason:
        extra["diverged"] = reason
        log(f"WARNING: {reason}; the record is flagged as diverged")


def best_and_last(history: list[dict]) -> dict[str, float]:
    """A record's metrics from the per-epoch validation in ``history``.

    ``top1``/``top5``: the last epoch (what older records hold and the report reads);
    ``top1_last``/``top5_last``: the same, named; ``top1_best``/``top5_best``/``best_epoch``: the
    epoch of highest top-1 (the earliest on ties, as the authors' ``acc1 > best_acc1``) and its
    top-5 (the authors' eval_semisup.py keeps that pair).
    """
    rows = [r for r in history if "top1" in r]
    if not rows or rows[-1] is not history[-1]:
        raise CghError("the last epoch was not validated; delete the run state to start over")
    last = rows[-1]
    best = max(rows, key=lambda r: (r["top1"], -r["epoch"]))
    return {"top1": last["top1"], "top5": last["top5"], "top1_last": last["top1"], "top5_last": last["top5"],
            "top1_best": best["top1"], "top5_best": best["top5"], "best_epoch": best["epoch"]}


def load_state(path: Path, identity: dict) -> dict | None:
    """The saved run state, or None; a state written for another checkpoint/dataset/setup is an error."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CghError(f"{path}: unreadable run state ({e}); delete it to start over") from None
    if state.get("identity") != identity:
        diff = sorted(k for k in set(identity) | set(state.get("identity", {}))
                      if identity.get(k) != state.get("identity", {}).get(k))
        raise CghError(f"{path} belongs to a different run (differs in: {', '.join(diff)}); "
                       "use another output_dir or delete that file to start over")
    return state


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, *, batch_size: int, num_workers: int, device: torch.device,
             precision: str = "fp32") -> dict[str, float]:
    """Top-1/top-5 (percent) over ``ds``; each process scores every world-th image, counts are summed.
    ``precision``: the backbone's on a GPU ("fp32", or "bf16" autocast)."""
    rank, size = world()
    shard = Subset(ds, range(rank, len(ds), size)) if size > 1 else ds
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.long)   # top-1 hits, top-5 hits, images
    for images, targets in loader:
        images, targets = _to_device(images, targets, device)
        with autocast(device, precision):
            logits = model(images)
        hits = topk_correct(logits.float(), targets, (1, 5))
        counts += torch.stack([hits[1], hits[5], torch.tensor(targets.shape[0], device=device)])
    if size > 1:
        dist.all_reduce(counts)
    n = counts[2].item()
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n}


def _to_device(images, targets, device):
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.as_tensor(targets).to(device, non_blocking=True)


def _batchnorm_trains_per_process(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm) and m.training
               for m in model.modules())


def fit(model: nn.Module, train_ds: Dataset, *, optimizer: torch.optim.Optimizer,
        lr_factor: Callable[[int, int], float], epochs: int, batch_size: int, num_workers: int, device: torch.device,
        state_module: nn.Module, state_path: Path, identity: dict, val_ds: Dataset, seed: int = 0,
        precision: str = "fp32", drop_last: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Train ``model`` for ``epochs`` (resuming from ``state_path``), validating on ``val_ds`` after
    every epoch; return the per-epoch history (loss, lr, top1, top5).

    ``state_module`` is the part whose tensors change (the head of a linear probe, the whole
    network when fine-tuning); ``identity`` must match a saved state for it to be resumed. Before
    every iteration each param group's lr is its ``initial_lr`` times ``lr_factor(global iteration,
    iterations per epoch)``, so a resumed run sets the same rates. ``drop_last``: drop each epoch's
    last partial batch (the authors' linear probe) or keep it (their semi-supervised script); a
    split smaller than one batch is always kept. Under torchrun every process draws as many images
    (the DistributedSampler pads by repeating a few, as in the authors' scripts). ``precision``:
    the forward passes' on a GPU.
    """
    rank, size = world()
    if batch_size % size:
        raise CghError(f"batch_size {batch_size} is not divisible by the {size} processes")
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    model.to(device)    # before loading optimizer state, which follows its parameters' device
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    history: list[dict] = []
    start = 0
    state = load_state(state_path, identity)
    if state is not None:
        state_module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"])
        log(f"resuming from {state_path} after epoch {start}")
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if size > 1 else model
    drop = drop_last and len(train_ds) >= batch_size
    per_process = batch_size // size
    for epoch in range(start, epochs):
        # augmentation (main process and worker seeds) differs per process, as its images do; one
        # process: the data order too. The DistributedSampler's order depends on (seed, epoch) only.
        stream = seed * 100003 + epoch * size + rank
        torch.manual_seed(stream)
        gen = torch.Generator().manual_seed(stream)
        if size > 1:
            sampler = DistributedSampler(train_ds, num_replicas=size, rank=rank, shuffle=True, seed=seed,
                                         drop_last=False)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(train_ds, generator=gen)
        loader = DataLoader(train_ds, batch_size=per_process, sampler=sampler, num_workers=num_workers,
                            pin_memory=device.type == "cuda", drop_last=drop, generator=gen,
                            persistent_workers=False)
        per_epoch = len(loader)
        net.train()
        if not drop and len(sampler) % per_process == 1 and _batchnorm_trains_per_process(model):
            raise CghError(f"each epoch's last batch would hold 1 image per process ({len(sampler)} images, "
                           f"{per_process} a batch), on which BatchNorm cannot train; set drop_last=true or "
                           "another batch_size")
        loss_sum = torch.zeros((), device=device)
        steps = 0
        for images, targets in loader:
            factor = lr_factor(epoch * per_epoch + steps, per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            images, targets = _to_device(images, targets, device)
            with autocast(device, precision):
                logits = net(images)
            loss = F.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        totals = torch.stack([loss_sum.double(), torch.tensor(float(steps), dtype=torch.float64, device=device)])
        if size > 1:        # every process logs, and stops on, the same global mean
            dist.all_reduce(totals)
        loss_mean = totals[0].item() / max(totals[1].item(), 1)
        if not math.isfinite(loss_mean):
            raise CghError(f"training loss became {loss_mean} in epoch {epoch + 1}; lower the learning rate")
        acc = evaluate(model, val_ds, batch_size=batch_size, num_workers=num_workers, device=device,
                       precision=precision)
        history.append({"epoch": epoch + 1, "loss": loss_mean, "lr": optimizer.param_groups[0]["lr"], **acc})
        log(f"epoch {epoch + 1}/{epochs} loss {loss_mean:.4f} val top-1 {acc['top1']:.2f} top-5 {acc['top5']:.2f}")
        if rank == 0:
            with atomic_path(state_path) as tmp:
                torch.save({"model": state_module.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch + 1, "history": history, "identity": identity}, tmp)
    return history
