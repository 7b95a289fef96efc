"""BatchNorm for the teacher: split-BN on one device, shuffle-BN across processes.

Both exist for the same reason (MoCo, sec. 3.3): if a teacher's BatchNorm statistics are computed
over exactly the samples the student sees together, the two networks can "cheat" through the batch
statistics. Under DDP the teacher's batch is shuffled across processes before its forward pass and
unshuffled after (``batch_shuffle_ddp``/``batch_unshuffle_ddp``). On one device the authors instead
split the batch into 8 BatchNorm groups (``SplitBatchNorm2d``, simulating 8 GPUs) and shuffle it
locally (``batch_shuffle_single``), so the teacher's groups differ from the student's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cgh.distributed import is_dist
from cgh.errors import CghError
from cgh.queue import concat_all_gather


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed separately over ``num_splits`` groups.

    Training: the batch ``[N, C, H, W]`` is cut into ``G = num_splits`` groups of ``N / G``
    consecutive samples (group ``j`` holds samples ``j N/G .. (j+1) N/G - 1``), each normalised
    with its own mean/variance, exactly what ``G`` GPUs with plain BN would compute. MoCo's CIFAR
    demo interleaves the groups (samples ``j, j + G, ...``) through a reshape; on a random batch the
    two partitions are equivalent, and blocks stay views of a channels_last tensor (the reshape
    copied every activation twice per layer on the GPU). The running statistics of all groups are
    updated as if each had its own BN and then averaged, as in MoCo's CIFAR demo. Evaluation uses
    the running statistics like any BatchNorm. The parameters and buffers have the same names and
    shapes as ``nn.BatchNorm2d``, so a model with split-BN exports as a plain torchvision ResNet.
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise CghError(f"bn_splits must be >= 1 (got {num_splits})")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, g = x.shape[0], self.num_splits
        if n % g:
            raise CghError(f"split BatchNorm needs the per-device batch ({n}) to be divisible by "
                           f"bn_splits ({g})")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        if torch.compiler.is_compiling():
            return self.grouped_forward(x, factor)
        # Each group is a contiguous block of the batch, so it is a view in either memory format
        # and runs through the fused (cuDNN) kernel as it is; each group updates its own copy of
        # the running statistics, averaged afterwards.
        means = self.running_mean.repeat(g, 1) if self.track_running_stats else [None] * g
        vars_ = self.running_var.repeat(g, 1) if self.track_running_stats else [None] * g
        y = torch.cat([F.batch_norm(block, means[j], vars_[j], self.weight, self.bias, True, factor, self.eps)
                       for j, block in enumerate(x.chunk(g))])
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(means.mean(0))
                self.running_var.copy_(vars_.mean(0))
        return y

    def grouped_forward(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        """The same normalisation written as one reduction over all groups plus pointwise ops, in
        float32 like inductor's own BatchNorm: what ``torch.compile`` traces. Eager mode keeps the
        per-block fused kernels, which are faster there. Compiled, it is one reduction per layer
        instead of ``G``: inductor generates 338 kernels for a ResNet-18 forward + backward with
        G = 8 (251 with plain BN), against 1040 when it traces the per-block forward."""
        g = self.num_splits
        blocks = x.unflatten(0, (g, x.shape[0] // g)).float()   # [G, N/G, C, H, W], a view of x
        var, mean = torch.var_mean(blocks, dim=(1, 3, 4), correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float().view(1, 1, -1, 1, 1)
        y = (blocks - mean) * scale
        if self.bias is not None:
            y = y + self.bias.float().view(1, 1, -1, 1, 1)
        if self.track_running_stats:
            count = blocks[0].numel() // blocks.shape[2]
            with torch.no_grad():
                self.running_mean.lerp_(mean.flatten(1).mean(0).to(self.running_mean.dtype), factor)
                unbiased = var.flatten(1).mean(0) * (count / max(count - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype).flatten(0, 1)


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by ``SplitBatchNorm2d`` (weights and buffers
    kept, in place for children; returns the possibly new root). ``num_splits <= 1`` is a no-op."""
    if num_splits <= 1:
        return module
    if type(module) is nn.BatchNorm2d:
        new = SplitBatchNorm2d(module.num_features, num_splits, eps=module.eps,
                               momentum=module.momentum, affine=module.affine,
                               track_running_stats=module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for p_new, p_old in zip(new.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new.to(module.weight.device if module.affine else module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, convert_split_batchnorm(child, num_splits))
    return module


@torch.compiler.disable
def _random_permutation(n: int, device: torch.device, broadcast: bool = False) -> torch.Tensor:
    """``torch.randperm(n)`` drawn eagerly, outside any ``torch.compile`` graph (the same draw from
    the same RNG). Inductor of PyTorch 2.11 fails on ``x[torch.randperm(...)]`` inside a graph
    ("Not all inputs to pattern found in match.kwargs", its randperm-index pattern), which is
    what made ``run.compile`` fail with split-BN. ``broadcast``: rank 0's draw goes to every process."""
    perm = torch.randperm(n, device=device)
    if broadcast:
        dist.broadcast(perm, src=0)
    return perm


@torch.no_grad()
def batch_shuffle_single(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly permute the batch on this device; returns (shuffled x, index that undoes it)."""
    perm = _random_permutation(x.shape[0], x.device)
    return x[perm], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle_single(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    return x[idx_unshuffle]


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle the global batch across processes (MoCo's shuffle-BN); no-op on one process.

    Every process gathers all images, rank 0 draws the permutation and broadcasts it, and each
    process keeps its slice. Returns (this process's shuffled images, global unshuffle index).
    """
    if not is_dist():
        return x, None
    x_all = concat_all_gather(x)
    perm = _random_permutation(x_all.shape[0], x.device, broadcast=True)
    mine = perm.view(dist.get_world_size(), -1)[dist.get_rank()]
    return x_all[mine], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Undo ``batch_shuffle_ddp`` on the teacher's outputs; no-op on one process."""
    if idx_unshuffle is None:
        return x
    x_all = concat_all_gather(x)
    mine = idx_unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
    return x_all[mine]
