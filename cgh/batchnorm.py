"""BatchNorm for the teacher: split-BN on one device, shuffle-BN across processes.

Both exist for the same reason (MoCo, sec. 3.3): if a teacher's BatchNorm statistics are computed
over exactly the samples the student sees together, the two networks can "cheat" through the batch
statistics. Under DDP the teacher's batch is shuffled across processes before its forward pass and
unshuffled after (``batch_shuffle_ddp``/``batch_unshuffle_ddp``). On one device the authors instead
split the batch into 8 BatchNorm groups (``SplitBatchNorm2d``, simulating 8 GPUs; interleaved
samples, as their code) and shuffle it locally (``batch_shuffle_single``), so the teacher's groups
differ from the student's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cgh.distributed import is_dist
from cgh.errors import CghError
from cgh.queue import concat_all_gather


SPLIT_ORDERS = ("interleaved", "contiguous")


def check_split_order(order: str) -> str:
    if order not in SPLIT_ORDERS:
        raise CghError(f"model.bn_split_order '{order}' unknown; expected one of {', '.join(SPLIT_ORDERS)}")
    return order


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed separately over ``num_splits`` groups.

    Training: the batch ``[N, C, H, W]`` is cut into ``G = num_splits`` groups of ``N / G``
    samples, each normalised with its own mean/variance, what ``G`` GPUs with plain BN would
    compute. ``order`` says which samples share a group:
    - ``"interleaved"`` (the authors' ``SplitBatchNorm``, from MoCo's CIFAR demo): group ``j``
      holds samples ``j, j + G, j + 2G, ...``. Their ``input.view(-1, C * G, H, W)`` puts sample
      ``n`` channel ``c`` on row ``n // G``, channel ``(n % G) * C + c``, so BN's per-channel
      statistics pool the samples with the same ``n % G``;
    - ``"contiguous"``: group ``j`` holds the block ``j N/G .. (j+1) N/G - 1``. On a random batch
      the two partitions are equivalent in distribution, and blocks stay views of a channels_last
      tensor, so eager mode runs each block through the fused (cuDNN) kernel.
    The running statistics of all groups are updated as if each had its own BN and then averaged
    (as the authors' code does). Evaluation uses the running statistics like any BatchNorm. The
    parameters and buffers have the same names and shapes as ``nn.BatchNorm2d``, so a model with
    split-BN exports as a plain torchvision ResNet.
    """

    def __init__(self, num_features: int, num_splits: int = 8, order: str = "interleaved", **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise CghError(f"bn_splits must be >= 1 (got {num_splits})")
        self.num_splits = num_splits
        self.order = check_split_order(order)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}, order={self.order}"

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
        if self.order == "interleaved" or torch.compiler.is_compiling():
            # Interleaved groups are strided, not blocks: one grouped reduction over a view (no
            # layout copy in either memory format) instead of the authors' reshape, which copies a
            # channels_last activation.
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
        """The same normalisation as one reduction over all groups plus one pointwise pass, forward
        and backward (``GroupedBatchNorm``): what ``torch.compile`` traces, and the eager path of
        interleaved groups. Eager contiguous groups keep the per-block fused kernels, which are
        faster there."""
        y, mean, var = GroupedBatchNorm.apply(x, self.weight, self.bias, self.num_splits, self.eps,
                                              self.order == "interleaved")
        if self.track_running_stats:
            count = x.numel() // x.shape[1] // self.num_splits
            with torch.no_grad():
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
                unbiased = var.mean(0) * (count / max(count - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y


def _groups(t: torch.Tensor, groups: int, interleaved: bool) -> torch.Tensor:
    """``[N, ...]`` -> a ``[G, N / G, ...]`` view whose row ``j`` is group ``j``'s samples:
    ``j, j + G, ...`` (interleaved) or the ``j``-th block of ``N / G`` consecutive samples."""
    n = t.shape[0]
    if interleaved:
        return t.unflatten(0, (n // groups, groups)).transpose(0, 1)
    return t.unflatten(0, (groups, n // groups))


def _per_sample(t: torch.Tensor, n: int, interleaved: bool) -> torch.Tensor:
    """``[G, C]`` per-group values -> ``[N, C, 1, 1]``, each sample getting its group's row
    (broadcasts over the batch ``[N, C, H, W]``)."""
    g, c = t.shape
    rows = t[:, None, :].expand(g, n // g, c)                   # [G, N/G, C], as _groups lays it out
    return (rows.transpose(0, 1) if interleaved else rows).reshape(n, c, 1, 1)


def _group_sums(t: torch.Tensor, groups: int, interleaved: bool) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[G, C]`` sums over each group's samples and positions."""
    return _groups(t, groups, interleaved).sum(dim=(1, 3, 4))


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 activations, float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


class GroupedBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over ``G`` groups of samples, with its backward written out the way
    inductor writes BatchNorm's own: one reduction (``sum dy``, ``sum dy * x_hat``) and one
    pointwise pass. Differentiating the forward's formula instead (``var_mean``, then scale and
    shift) gave the compiled R50 backward ~10 ms of extra passes over the activations and four
    layout copies on an H100. Statistics in float32 (float64 for float64 input); the output has
    the input's dtype and memory format.

    ``apply(x [N, C, H, W], weight, bias (or None), groups, eps, interleaved=False)`` -> ``(y,
    mean [G, C], biased var [G, C])``; mean and var carry no gradient. ``interleaved``: group
    ``j`` is samples ``j, j + G, ...``; else the ``j``-th block of ``N / G`` consecutive ones."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, interleaved: bool = False):
        n = x.shape[0]
        blocks = _groups(x, groups, interleaved)          # a view of x, in either memory format
        acc = _stats_dtype(x)
        var, mean = torch.var_mean(blocks.to(acc), dim=(1, 3, 4), correction=0)
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight.to(acc)
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        y = (x.to(acc) * _per_sample(scale, n, interleaved) + _per_sample(shift, n, interleaved)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups, ctx.interleaved = groups, interleaved
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, rstd = ctx.saved_tensors
        g, n, inter = ctx.groups, x.shape[0], ctx.interleaved
        count = x.numel() // x.shape[1] // g
        acc = _stats_dtype(x)
        dy_acc = dy.to(acc)
        x_hat = (x.to(acc) - _per_sample(mean, n, inter)) * _per_sample(rstd, n, inter)
        sum_dy = _group_sums(dy_acc, g, inter)                      # [G, C]
        sum_dy_xhat = _group_sums(dy_acc * x_hat, g, inter)         # [G, C]
        scale = rstd if weight is None else rstd * weight.to(acc)
        dx = _per_sample(scale, n, inter) * (dy_acc - _per_sample(sum_dy / count, n, inter)
                                             - x_hat * _per_sample(sum_dy_xhat / count, n, inter))
        dweight = sum_dy_xhat.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sum_dy.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None   # affine: both or neither
        return dx.to(x.dtype), dweight, dbias, None, None, None


def convert_split_batchnorm(module: nn.Module, num_splits: int, order: str = "interleaved") -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by ``SplitBatchNorm2d`` with ``order``'s
    groups (weights and buffers kept, in place for children; returns the possibly new root).
    ``num_splits <= 1`` is a no-op."""
    check_split_order(order)
    if num_splits <= 1:
        return module
    if type(module) is nn.BatchNorm2d:
        new = SplitBatchNorm2d(module.num_features, num_splits, order, eps=module.eps,
                               momentum=module.momentum, affine=module.affine,
                               track_running_stats=module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for p_new, p_old in zip(new.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new.to(module.weight.device if module.affine else module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, convert_split_batchnorm(child, num_splits, order))
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
