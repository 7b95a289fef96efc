"""Split-BN equals plain BN run on each group separately (interleaved groups as the authors'
``SplitBatchNorm``, or contiguous blocks); shuffle helpers undo themselves."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cgh.backbone import build_backbone
from cgh.batchnorm import (GroupedBatchNorm, SplitBatchNorm2d, batch_shuffle_ddp, batch_shuffle_single,
                           batch_unshuffle_ddp, batch_unshuffle_single, convert_split_batchnorm)
from cgh.errors import CghError

G, N, C = 4, 12, 3
ORDERS = ["interleaved", "contiguous"]


def group_samples(j: int, order: str) -> list[int]:
    """The samples of group ``j``, written out: ``j, j + G, ...`` or the ``j``-th block."""
    return list(range(j, N, G)) if order == "interleaved" else list(range(j * N // G, (j + 1) * N // G))


def make_pair(order="interleaved"):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(C)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
        plain.running_mean.uniform_(-1, 1)
        plain.running_var.uniform_(0.5, 2)
    split = convert_split_batchnorm(copy.deepcopy(plain), G, order)
    assert isinstance(split, SplitBatchNorm2d) and split.num_splits == G and split.order == order
    return plain, split


@pytest.fixture(params=["blocks", "grouped"])
def split_path(request, monkeypatch):
    """Eager split-BN runs each block through the fused kernel; under torch.compile it traces
    ``grouped_forward`` (one reduction for all groups). Both must be the same BatchNorm."""
    if request.param == "grouped":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


@pytest.mark.parametrize("order", ORDERS)
def test_split_bn_equals_per_group_bn(split_path, order):
    plain, split = make_pair(order)
    x = torch.randn(N, C, 5, 5) * 3 + 1
    r = torch.randn(N, C, 5, 5)
    xs = x.clone().requires_grad_(True)
    y = split(xs)
    (y * r).sum().backward()

    # Reference: G independent BatchNorms, one per group of samples (group_samples).
    means, vars_, grads_w, grads_b = [], [], [], []
    for j in range(G):
        block = group_samples(j, order)
        bn = copy.deepcopy(plain)
        xj = x[block].clone().requires_grad_(True)
        yj = bn(xj)
        (yj * r[block]).sum().backward()
        torch.testing.assert_close(y[block], yj, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs.grad[block], xj.grad, rtol=1e-4, atol=1e-5)
        means.append(bn.running_mean)
        vars_.append(bn.running_var)
        grads_w.append(bn.weight.grad)
        grads_b.append(bn.bias.grad)
    # Running statistics: each group's update, averaged over groups.
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(vars_).mean(0))
    torch.testing.assert_close(split.weight.grad, torch.stack(grads_w).sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.bias.grad, torch.stack(grads_b).sum(0), rtol=1e-4, atol=1e-5)
    assert int(split.num_batches_tracked) == 1
    # And it really differs from whole-batch BN, and from the other grouping.
    assert not torch.allclose(y, copy.deepcopy(plain)(x), atol=1e-3)
    other = make_pair(ORDERS[1 - ORDERS.index(order)])[1]
    assert not torch.allclose(y, other(x), atol=1e-3)


def authors_split_bn(x: torch.Tensor, bn: nn.BatchNorm2d, g: int):
    """The authors' ``SplitBatchNorm`` in training (zaczgao/Cross-Context_Learning,
    models/network.py), as a formula: the batch viewed as ``[N / G, G * C, H, W]`` through one
    BatchNorm with the weights, bias and running statistics repeated G times; the running
    statistics are then the mean over the G copies. Returns (y, running_mean, running_var)."""
    n, c, h, w = x.shape
    mean, var = bn.running_mean.repeat(g), bn.running_var.repeat(g)
    y = F.batch_norm(x.reshape(-1, c * g, h, w), mean, var, bn.weight.repeat(g), bn.bias.repeat(g),
                     True, bn.momentum, bn.eps).reshape(n, c, h, w)
    return y, mean.view(g, c).mean(0), var.view(g, c).mean(0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_interleaved_split_bn_is_the_authors_reshape(split_path, channels_last):
    """``order="interleaved"`` gives what the authors' reshape gives: outputs, running statistics,
    and the gradients of the input, weight and bias."""
    plain, split = make_pair("interleaved")
    x = torch.randn(N, C, 5, 5) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(N, C, 5, 5)
    ref_bn = copy.deepcopy(plain)
    x_ref, x_got = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, want_mean, want_var = authors_split_bn(x_ref, ref_bn, G)
    (want * r).sum().backward()
    got = split(x_got)
    (got * r).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.running_mean, want_mean)
    torch.testing.assert_close(split.running_var, want_var)
    torch.testing.assert_close(x_got.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.weight.grad, ref_bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.bias.grad, ref_bn.bias.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_grouped_batch_norm_backward_is_the_derivative(affine, interleaved):
    """``GroupedBatchNorm``'s hand-written backward (what compiled split-BN differentiates) against
    finite differences of its forward, in float64, with and without affine parameters; its
    statistics are each group's mean and biased variance."""
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 3, 2, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True) if affine else None
    bias = torch.randn(3, dtype=torch.float64).requires_grad_(True) if affine else None
    inputs = (x, weight, bias) if affine else (x,)

    def normalised(*args):
        return GroupedBatchNorm.apply(*(args if affine else (*args, None, None)), 4, 1e-5, interleaved)[0]

    assert torch.autograd.gradcheck(normalised, inputs)
    _, mean, var = GroupedBatchNorm.apply(x, weight, bias, 4, 1e-5, interleaved)
    # group j: samples j and j + 4 (interleaved) or samples 2j and 2j + 1 (blocks)
    blocks = x.detach().view(2, 4, 3, 3, 2).transpose(0, 1) if interleaved else x.detach().view(4, 2, 3, 3, 2)
    torch.testing.assert_close(mean, blocks.mean(dim=(1, 3, 4)))
    torch.testing.assert_close(var, blocks.var(dim=(1, 3, 4), unbiased=False))


def test_split_bn_eval_uses_running_stats():
    plain, split = make_pair()
    plain.eval()
    split.eval()
    x = torch.randn(N, C, 4, 4)
    torch.testing.assert_close(split(x), plain(x))


@pytest.mark.parametrize("order", ORDERS)
def test_split_bn_channels_last_and_bad_batch(split_path, order):
    _, split = make_pair(order)
    x = torch.randn(N, C, 4, 4)
    ref = copy.deepcopy(split)(x)
    y = split(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 in, bf16 out, statistics in float32
        y16 = copy.deepcopy(split)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref, rtol=0.02, atol=0.02)
    with pytest.raises(CghError, match="divisible by bn_splits"):
        split(torch.randn(N + 1, C, 4, 4))


def test_convert_resnet_keeps_weights_and_names():
    net = build_backbone("resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net = convert_split_batchnorm(net, 8, "contiguous")
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm2d) and m.order == "contiguous" for m in bns)
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    plain = build_backbone("resnet18")
    assert convert_split_batchnorm(plain, 1) is plain
    assert not any(isinstance(m, SplitBatchNorm2d) for m in plain.modules())
    assert convert_split_batchnorm(build_backbone("resnet18"), 8).bn1.order == "interleaved"   # the authors'
    with pytest.raises(CghError, match=r"model.bn_split_order 'random' unknown; expected one of interleaved, contiguous"):
        convert_split_batchnorm(plain, 8, "random")


def test_shuffle_helpers_round_trip():
    x = torch.arange(16.0).view(8, 2)
    shuffled, idx = batch_shuffle_single(x)
    assert sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    torch.testing.assert_close(batch_unshuffle_single(shuffled, idx), x)
    # Not distributed: the DDP versions leave the batch alone.
    same, idx = batch_shuffle_ddp(x)
    assert same is x and idx is None
    assert batch_unshuffle_ddp(x, None) is x
