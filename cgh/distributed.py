"""torch.distributed plumbing for pretraining: init from ``torchrun``'s environment, rank helpers,
and a synchronised BatchNorm that also runs on CPU (gloo).

One process per device. ``torchrun --nproc_per_node=G [--nnodes=N ...] -m cgh.cli pretrain ...``
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; without them the run is a single
process and every helper here is a no-op.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from cgh.errors import CghError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> torch.device:
    """Join the process group described by torchrun's environment and pick this process's device.

    NCCL when the device is a GPU, gloo on CPU (so the multi-process path is testable without GPU).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CghError(f"device '{device}' requested but no CUDA GPU is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if launched_by_torchrun() and not is_dist():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if use_cuda else {}))
    return dev


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place, returned for chaining (identity on one process)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's Python object on every rank (used for the resume decision)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the whole global batch, on any backend.

    ``nn.SyncBatchNorm`` refuses CPU tensors; this one sums (count, sum, sum of squares) over
    processes with the autograd-aware ``torch.distributed.nn.functional.all_reduce``, so gradients
    flow through the statistics exactly as with one process holding the whole batch. Used on CPU;
    on GPU ``convert_sync_batchnorm`` picks PyTorch's fused ``nn.SyncBatchNorm`` instead.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        # float64 sums: var = E[x^2] - E[x]^2 loses precision in float32 when |mean| >> std
        xd = xf.double()
        count = torch.full((1,), xf.numel() / xf.shape[1], dtype=torch.float64, device=x.device)
        stats = all_reduce(torch.cat([count, xd.sum(dims), (xd * xd).sum(dims)]))
        c = x.shape[1]
        n = stats[0]
        mean = stats[1:1 + c] / n
        var = (stats[1 + c:] / n - mean * mean).float()
        mean = mean.float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every plain ``BatchNorm1d/2d`` (exact type; split-BN is left alone) by a synchronised
    one: ``nn.SyncBatchNorm`` on GPU, ``GlobalBatchNorm`` elsewhere. Weights and buffers are kept."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d)

    def convert(m: nn.Module) -> nn.Module:
        if type(m) in plain:
            cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
            new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            new.load_state_dict(m.state_dict())
            new.train(m.training)
            for p_new, p_old in zip(new.parameters(), m.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            return new
        for name, child in m.named_children():
            setattr(m, name, convert(child))
        return m

    return convert(module)
