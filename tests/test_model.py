"""CGHModel: hypercolumn shapes per layer subset, EMA arithmetic, teacher isolation, queue flow."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cgh.backbone import backbone_state_dict, build_backbone, load_backbone_weights
from cgh.batchnorm import SplitBatchNorm2d
from cgh.errors import CghError
from cgh.losses import cgh_loss
from cgh.model import STAGES, CGHModel, HypercolumnHead, resize_bilinear, stage_channels, stage_features

SMALL = dict(dim=16, hidden_dim=32, queue_size=32)


def small_model(**kw):
    torch.manual_seed(0)
    return CGHModel(**{"arch": "resnet18", "bn_splits": 2, **SMALL, **kw})


@functools.lru_cache(maxsize=None)
def stage_outputs(arch):
    """One 64 px forward per architecture (stages at 16, 8, 4 and 2 px), shared by the subsets."""
    torch.manual_seed(0)
    net = build_backbone(arch).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, maps = stage_features(net, x, STAGES)
        torch.testing.assert_close(pooled, net(x))  # same pooled feature as torchvision's forward
    return dict(zip(STAGES, maps))


@pytest.mark.parametrize("arch, channels", [("resnet18", (64, 128, 256, 512)),
                                            ("resnet50", (256, 512, 1024, 2048))])
@pytest.mark.parametrize("layers", [("layer4",), ("layer3", "layer4"), ("layer2", "layer4"),
                                    ("layer1", "layer2", "layer3", "layer4")])
def test_hypercolumn_shapes(arch, channels, layers):
    outputs = stage_outputs(arch)
    maps = [outputs[n] for n in layers]
    assert [m.shape[1] for m in maps] == [stage_channels(arch)[n] for n in layers]
    expected_c = sum(channels[int(n[-1]) - 1] for n in layers)
    with torch.no_grad():
        hyper = HypercolumnHead.hypercolumn(maps)
        assert hyper.shape == (2, expected_c, 2, 2)
        # The last chosen stage enters unchanged; a stage twice as large is bilinearly
        # halved, which with align_corners=False is exactly a 2x2 average.
        torch.testing.assert_close(hyper[:, -channels[3]:], maps[-1])
        if "layer3" in layers:
            start = sum(channels[int(n[-1]) - 1] for n in layers if n < "layer3")
            torch.testing.assert_close(hyper[:, start:start + channels[2]], F.avg_pool2d(maps[-2], 2))
        head = HypercolumnHead(expected_c, 32, 24, 16).eval()
        assert head.context(maps).shape == (2, 32)
        assert head(maps).shape == (2, 16)


@pytest.mark.parametrize("size_in, size_out", [((56, 56), (7, 7)), ((28, 28), (7, 7)), ((14, 14), (7, 7)),
                                               ((15, 12), (5, 4)), ((8, 6), (4, 2)), ((13, 13), (7, 7))])
def test_resize_bilinear_equals_interpolate(size_in, size_out):
    """The hypercolumn's strided-slice resize is bilinear interpolation (align_corners=False):
    values and input gradients equal F.interpolate's for even, odd and mixed integer factors, and
    for a size that does not divide (13 -> 7, where it falls back to F.interpolate itself). The
    hypercolumn of channels_last maps stays channels_last (else its 1x1 conv gets a layout copy)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size_in, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 3, *size_out, dtype=torch.float64)
    got_x, want_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = resize_bilinear(got_x, size_out)
    want = F.interpolate(want_x, size=size_out, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want)
    (got * r).sum().backward()
    (want * r).sum().backward()
    torch.testing.assert_close(got_x.grad, want_x.grad)
    last = torch.randn(2, 4, *size_out, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert HypercolumnHead.hypercolumn([x, last]).is_contiguous(memory_format=torch.channels_last)
    assert resize_bilinear(x, size_in) is x


def test_model_hypercolumn_input_width_follows_layers():
    m = small_model(layers=["layer4", "layer1"], hyper_channels=16)
    assert m.layers == ("layer1", "layer4")  # network order whatever the config order
    assert m.student_hyper_head.reduce[0].in_channels == 64 + 512
    assert m.student_hyper_head.reduce[0].out_channels == 16
    assert small_model().student_hyper_head.reduce[0].out_channels == 512  # backbone width (authors)


def test_unknown_layer_and_bad_options():
    with pytest.raises(CghError, match="unknown hypercolumn layer.*'layer5'.*layer1, layer2, layer3, layer4"):
        small_model(layers=("layer3", "layer5"))
    with pytest.raises(CghError, match="at least one layer"):
        small_model(layers=())
    with pytest.raises(CghError, match="unknown teacher_bn"):
        small_model(teacher_bn="sync")
    with pytest.raises(CghError, match="queue_size"):
        CGHModel.validate_queue(100, 32)
    CGHModel.validate_queue(128, 32)


def test_teacher_starts_as_copy_and_ema_is_exact():
    m = small_model(predictor=True)
    pairs = list(zip(m.teacher_backbone.parameters(), m.student_backbone.parameters()))
    pairs += zip(m.teacher_global_head.parameters(), m.student_global_head.parameters())
    pairs += zip(m.teacher_hyper_head.parameters(), m.student_hyper_head.parameters())
    for t, s in pairs:
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()
        assert not t.requires_grad and s.requires_grad
    with torch.no_grad():  # make the student differ, as after an optimiser step
        for _, s in pairs:
            s.add_(torch.randn_like(s))
    before = [(t.clone(), s.clone()) for t, s in pairs]
    bn_before = m.teacher_backbone.bn1.running_mean.clone()
    m.update_teacher(0.9)
    for (t, s), (t0, s0) in zip(pairs, before):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s0, rtol=1e-6, atol=1e-7)
        assert torch.equal(s, s0)
    assert torch.equal(m.teacher_backbone.bn1.running_mean, bn_before)
    assert not any("predictor" in n for n, _ in m.named_parameters() if n.startswith("teacher"))
    m.update_teacher(1.0)
    for (t, _), (t0, s0) in zip(pairs, before):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s0, rtol=1e-6, atol=1e-7)


def test_forward_outputs_queue_flow_and_gradients():
    m = small_model(teacher_bn="split").train()
    assert isinstance(m.teacher_backbone.bn1, SplitBatchNorm2d)
    assert isinstance(m.student_backbone.layer1[0].bn1, SplitBatchNorm2d)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 24, 24)]  # strong view + one small crop
    weak = torch.randn(8, 3, 32, 32)
    labels, idx = torch.arange(8) % 3, torch.arange(8) + 100
    queue_before = m.queue.global_keys.clone()

    out = m(views, weak, labels, idx)
    assert [z.shape for z in out["student_global"]] == [(8, 16), (8, 16)]
    assert [z.shape for z in out["student_hyper"]] == [(8, 16)]
    for z in out["student_global"] + out["student_hyper"] + [out["teacher_global"], out["teacher_hyper"]]:
        torch.testing.assert_close(z.norm(dim=1), torch.ones(8))
    assert out["queue_global"].shape == out["queue_hyper"].shape == (32, 16)
    torch.testing.assert_close(out["queue_global"], queue_before)  # read before the update
    assert torch.equal(out["batch_labels"], labels) and (out["queue_labels"] == -1).all()
    # This batch's teacher keys now sit in slots 0..7 of both queues, with their labels/indices.
    torch.testing.assert_close(m.queue.global_keys[:8], out["teacher_global"])
    torch.testing.assert_close(m.queue.hyper_keys[:8], out["teacher_hyper"])
    assert torch.equal(m.queue.labels[:8], labels) and torch.equal(m.queue.indices[:8], idx)
    assert not out["teacher_global"].requires_grad

    loss = cgh_loss(out, mode="cross", step=1, warmup_steps=4)
    loss["total"].backward()
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith("teacher"))
    grads = [p.grad for n, p in m.named_parameters() if n.startswith("student")]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("order", [None, "interleaved", "contiguous"])
def test_split_bn_order_reaches_every_backbone_batchnorm(order):
    """``bn_split_order`` (default: the authors' interleaved groups) is every split-BN's order, in
    student and teacher; the hypercolumn's BN stays a plain BatchNorm, as in the authors' code."""
    m = small_model(teacher_bn="split", **({} if order is None else {"bn_split_order": order}))
    splits = [mod for net in (m.student_backbone, m.teacher_backbone) for mod in net.modules()
              if isinstance(mod, nn.BatchNorm2d)]
    assert len(splits) == 2 * 20   # ResNet-18: bn1, 2 per block x 8, 3 downsample
    assert all(isinstance(b, SplitBatchNorm2d) and b.order == (order or "interleaved") for b in splits)
    assert type(m.student_hyper_head.reduce[1]) is nn.BatchNorm2d
    with pytest.raises(CghError, match="model.bn_split_order 'blocks' unknown"):
        small_model(teacher_bn="split", bn_split_order="blocks")


def test_student_backbone_exports_as_torchvision_resnet():
    m = small_model(teacher_bn="split")
    fresh = build_backbone("resnet18")
    load_backbone_weights(fresh, backbone_state_dict(m.student_backbone))  # strict
    assert isinstance(m.student_backbone.fc, nn.Identity)


def test_global_context_model_has_no_hypercolumn_branch():
    m = small_model(use_hypercolumn=False, teacher_bn="plain").train()
    assert m.student_hyper_head is None and m.teacher_hyper_head is None and m.queue.hyper_keys is None
    out = m([torch.randn(4, 3, 32, 32)], torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long),
            torch.arange(4))
    assert out["student_hyper"] == [] and out["teacher_hyper"] is None
    assert set(cgh_loss(out, mode="global", schedule="paper")) >= {"total", "gg"}


def test_channels_last_and_bf16_autocast():
    m = small_model(teacher_bn="plain").eval()  # eval: deterministic BN, so outputs can be compared
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = m([x], x)
        m = m.to(memory_format=torch.channels_last)
        cl = m([x.contiguous(memory_format=torch.channels_last)], x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl["student_hyper"][0], ref["student_hyper"][0], rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m([x], x)
    assert out["student_global"][0].dtype == torch.float32
    assert (out["student_global"][0] - ref["student_global"][0]).abs().max() < 0.1


def test_bad_batch_sizes():
    m = small_model(teacher_bn="plain", queue_size=30)
    with pytest.raises(CghError, match="teacher's batch size"):
        m([torch.randn(2, 3, 32, 32)], torch.randn(4, 3, 32, 32))
    with pytest.raises(CghError, match=r"queue_size \(30\)"):
        m([torch.randn(4, 3, 32, 32)], torch.randn(4, 3, 32, 32))
