"""``run.compile``: the compiled CGH model computes what the eager one computes, and its graphs
stay clear of the construct PyTorch 2.11's inductor fails on."""
from __future__ import annotations

import copy

import pytest
import torch

from cgh.model import CGHModel
from cgh.train import build_model, load_pretrain_config, param_groups, train_step


def _views(seed: int, batch: int = 16, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_graphs_draw_no_permutation():
    """Split-BN shuffles the teacher's batch with ``torch.randperm``. Inside a graph,
    ``x[torch.randperm(n)]`` makes PyTorch 2.11's inductor fail ("Not all inputs to pattern found
    in match.kwargs"), so the permutation is drawn eagerly: no captured graph may contain it, and
    the captured graphs, run as they are, give the eager outputs."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    eager = CGHModel("resnet18", dim=16, hidden_dim=32, queue_size=64, teacher_bn="split", bn_splits=2)
    traced = copy.deepcopy(eager)
    traced.compile(backend=record)
    student, teacher = _views(1)
    torch.manual_seed(5)
    want = eager([student], teacher)
    torch.manual_seed(5)
    got = traced([student], teacher)

    assert graphs, "nothing was compiled"
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert not any("randperm" in t for t in targets), sorted(t for t in targets if "rand" in t)
    for key in ("teacher_global", "teacher_hyper"):
        torch.testing.assert_close(got[key], want[key])
    torch.testing.assert_close(got["student_global"][0], want["student_global"][0])
    torch.testing.assert_close(traced.queue.snapshot()["queue_hyper"], eager.queue.snapshot()["queue_hyper"])


def test_compiled_split_bn_keeps_channels_last():
    """Compiled, split-BN traces ``grouped_forward`` (one reduction for all groups); a channels_last
    input must come out channels_last (else every following conv gets a layout copy on the GPU),
    with the eager values and running statistics."""
    from cgh.batchnorm import SplitBatchNorm2d

    torch.manual_seed(0)
    bn = SplitBatchNorm2d(8, 4)
    eager, compiled = copy.deepcopy(bn), torch.compile(copy.deepcopy(bn))
    x = (torch.randn(16, 8, 6, 6) * 2 + 1).contiguous(memory_format=torch.channels_last)
    y = compiled(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, eager(x))
    torch.testing.assert_close(compiled.running_var, eager.running_var)
    torch.testing.assert_close(compiled.running_mean, eager.running_mean)
    assert not torch.allclose(eager.running_mean, bn.running_mean)


@pytest.mark.parametrize("variant, small_crops", [
    ([], 0),
    (["model.predictor=true", "model.predictor_hidden=32", "model.teacher_bn=plain"], 2)])  # CGH-pred, multi-crop
def test_compiled_training_steps_match_eager(variant, small_crops):
    """Two full training steps (teacher EMA, split-BN teacher with its shuffle, a layer2 + layer4
    hypercolumn, queues, loss, SGD) through inductor on the CPU give the eager losses, first-step
    gradients, second-step embeddings and queues; so does CGH-pred with two multi-crop small views
    (a second view size in the same graph) and plain BN.

    The model runs in float64 (its embeddings and the loss stay float32): in float32 these tiny
    nets are too non-smooth to compare gradients (float32 rounding alone put eager gradients up to
    0.8 % from float64 ones at 128 px, and compiled ones a few %). In float64 the first-step
    gradients agree to 7e-6 of their scale. Second-step gradients are compared through what they
    produce: after the first update, differences of 1e-8 in the weights moved them by up to 9 %,
    in float64 too, so they are not compared directly."""
    cfg = load_pretrain_config(None, ["output_dir=unused", "data.root=unused", "model.arch=resnet18",
                                      "model.queue_size=32", "optim.batch_size=16", "data.image_size=64",
                                      "model.teacher_bn=split", "model.bn_splits=2", "model.hidden_dim=32",
                                      "model.dim=16", "model.layers=[layer2,layer4]", "optim.warmup_epochs=0",
                                      "run.compile=true", *variant])
    device = torch.device("cpu")
    torch.manual_seed(0)
    eager = build_model(cfg, 1, device).double()
    compiled = copy.deepcopy(eager)
    compiled.compile(mode=cfg.run.compile_mode)
    batches = []
    for step in range(2):
        student, teacher = _views(10 + step, size=64)
        small = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(step)).double()
                 for _ in range(small_crops)]
        batches.append((([student.double(), *small], teacher.double()), torch.arange(16) % 4,
                        torch.arange(16) + 16 * step))
    start = {name: value.clone() for name, value in eager.state_dict().items()}

    def run(model, cfg):
        opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.0, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        torch.manual_seed(7)   # the teacher's shuffle draws from the global RNG
        losses, first_grads = [], None
        for step, batch in enumerate(batches):
            loss, out = train_step(model, model, batch, opt, scaler, cfg, step, 100, 10, device, 0.05)
            losses.append(loss["total"].item())
            if first_grads is None:
                first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return losses, first_grads, out, model.state_dict()

    eager_cfg = copy.deepcopy(cfg)
    eager_cfg.run.compile = False   # the loss too: run.compile also compiles its relational terms
    want, got = run(eager, eager_cfg), run(compiled, cfg)
    assert want[0][0] != want[0][1]
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[1].keys() == want[1].keys() and len(want[1]) > 60
    scale = max(grad.abs().max() for grad in want[1].values())
    compared = 0
    for name, grad in want[1].items():
        if grad.abs().max() <= 1e-12 * scale:   # zero but for rounding: a bias in front of a BatchNorm
            assert got[1][name].abs().max() <= 1e-12 * scale, name
            continue
        assert (got[1][name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name
        compared += 1
    assert compared > 60
    assert len(got[2]["student_global"]) == 1 + small_crops
    for key in ("student_global", "student_hyper"):
        for view_got, view_want in zip(got[2][key], want[2][key]):
            torch.testing.assert_close(view_got, view_want, rtol=0, atol=1e-4)
    for key in ("teacher_global", "teacher_hyper"):
        torch.testing.assert_close(got[2][key], want[2][key], rtol=0, atol=1e-4)
    for key in ("queue.global_keys", "queue.hyper_keys"):
        torch.testing.assert_close(got[3][key], want[3][key], rtol=0, atol=1e-4)
    for key in ("queue.labels", "queue.indices", "queue.ptr"):
        assert torch.equal(got[3][key], want[3][key]), key
    # The steps moved the weights and filled the queue, so the comparison above has teeth.
    w = "student_backbone.layer2.0.conv1.weight"
    assert (want[3][w] - start[w]).abs().max() > 1e-3
    assert not torch.equal(want[3]["queue.hyper_keys"], start["queue.hyper_keys"])


@pytest.mark.parametrize("mode", ["cross", "same", "global"])
def test_compiled_loss_terms_match_eager(mode):
    """``run.compile`` also compiles the loss's relational terms (``cgh_loss(compiled=True)``):
    every mode, with a multi-crop view, gives the eager loss and gradients, through a compiled graph."""
    from torch._dynamo.utils import counters

    from test_losses import unit

    from cgh.losses import cgh_loss

    batch, size, dim = 8, 64, 16
    fixed = {"teacher_global": unit(batch, dim, seed=1), "teacher_hyper": unit(batch, dim, seed=2),
             "queue_global": unit(size, dim, seed=3), "queue_hyper": unit(size, dim, seed=4)}
    students = [unit(batch, dim, seed=5), unit(batch, dim, seed=6), unit(batch, dim, seed=7)]   # global, small crop, hyper

    def run(compiled):
        leaves = [s.clone().requires_grad_() for s in students]
        outputs = {**fixed, "student_global": leaves[:2], "student_hyper": leaves[2:]}
        loss = cgh_loss(outputs, mode=mode, step=10, warmup_steps=5, compiled=compiled)
        loss["total"].backward()
        return loss["total"].detach(), [leaf.grad for leaf in leaves]

    counters.clear()
    want, want_grads = run(False)
    assert counters["stats"]["unique_graphs"] == 0
    got, got_grads = run(True)
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    used = 2 if mode == "global" else 3   # the global mode has no hypercolumn term
    for grad_got, grad_want in zip(got_grads[:used], want_grads[:used]):
        assert grad_want.abs().max() > 0
        torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e-5 * grad_want.abs().max().item())
