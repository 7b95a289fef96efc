"""Pretraining numerics against the official sources (issue 18, item 7).

- the shipped configs, resolved by ``load_pretrain_config``, equal ``tests/official/pretrain.yaml``
  (each value with its source: the CGH authors' code, ReSSL's, or the paper);
- ``optim.weight_decay_exempt=bn_bias_names`` selects, on a ResNet-50 CGH model, exactly the
  parameters the authors' test (``'bn' in n or 'bias' in n``) exempts when applied to the names
  those parameters have in the authors' model;
- the lr warm-up (``optim.warmup_start``) equals the authors' ``adjust_learning_rate``;
- every global-context (ReSSL) config trains with ReSSL's own loss schedule.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torchvision import transforms as T

from cgh.config import CONFIG_DIR, to_dict
from cgh.errors import CghError
from cgh.schedules import warmup_cosine_lr
from cgh.train import build_model, build_transform, check_config, load_pretrain_config, param_groups, train_step

OFFICIAL = yaml.safe_load((Path(__file__).parent / "official" / "pretrain.yaml").read_text())
PLACES = ["output_dir=unused", "data.root=unused"]   # the configs leave both to the command line


def resolved(name: str, *overrides: str):
    return load_pretrain_config(name, [*PLACES, *overrides])


# ------------------------------------------------------------------------ the official table
def _jitter_strengths(jitter: T.ColorJitter) -> list[float]:
    """torchvision stores ColorJitter(b, c, s, h) as ranges (1-b, 1+b) ... (-h, h)."""
    return [jitter.brightness[1] - 1, jitter.contrast[1] - 1, jitter.saturation[1] - 1, jitter.hue[1]]


def _describe_view(view: T.Compose, prefix: str) -> dict:
    """``views.*`` facts of one view pipeline (op names in order, crop, jitter, blur, flip)."""
    facts, ops = {}, []
    for t in view.transforms:
        if isinstance(t, T.RandomApply):
            (inner,) = t.transforms
            name = type(inner).__name__
            if isinstance(inner, T.ColorJitter):
                facts[f"{prefix}.color_jitter"] = _jitter_strengths(inner)
                facts[f"{prefix}.color_jitter_p"] = t.p
            else:
                facts[f"{prefix}.blur_sigma"] = list(inner.sigma)
                facts[f"{prefix}.blur_p"] = t.p
            ops.append(name)
            continue
        ops.append(type(t).__name__)
        if isinstance(t, T.RandomResizedCrop):
            facts[f"{prefix}.crop_scale"] = list(t.scale)
            facts[f"{prefix}.crop_size"] = list(t.size)
        elif isinstance(t, T.RandomGrayscale):
            facts[f"{prefix}.grayscale_p"] = t.p
        elif isinstance(t, T.RandomHorizontalFlip):
            facts[f"{prefix}.flip_p"] = t.p
        elif isinstance(t, T.Normalize):
            facts["views.mean"], facts["views.std"] = list(t.mean), list(t.std)
    facts[f"{prefix}.ops"] = ops
    return facts


def view_facts(cfg) -> dict:
    """The ``views.*`` entries of the table, read off the CPU transform the config builds."""
    tf = build_transform(cfg.data)
    two = tf.main if cfg.data.multi_crop else tf
    student, teacher = _describe_view(two.student, "views.student"), _describe_view(two.teacher, "views.teacher")
    assert student["views.student.crop_scale"] == teacher["views.teacher.crop_scale"]
    assert student["views.student.flip_p"] == teacher["views.teacher.flip_p"]
    facts = {**student, **teacher, "views.crop_scale": student["views.student.crop_scale"],
             "views.flip_p": student["views.student.flip_p"]}
    if cfg.data.multi_crop:   # the main strong view, then the small crops
        crops = [next(t for t in view.transforms if isinstance(t, T.RandomResizedCrop))
                 for view in [two.student, *tf.small]]
        facts["views.crop_sizes"] = [c.size[0] for c in crops]
        facts["views.crop_min_scales"] = [c.scale[0] for c in crops]
        facts["views.crop_max_scales"] = [c.scale[1] for c in crops]
    return facts


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _same(got, want) -> bool:
    if isinstance(want, list):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, float) or (isinstance(want, int) and isinstance(got, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and math.isclose(got, want, rel_tol=1e-9)
    return type(got) is type(want) and got == want


def test_official_table_cites_real_sources():
    """Every entry names a source of the table; every repository source pins a 40-hex commit."""
    sources = OFFICIAL["sources"]
    for name, src in sources.items():
        if "repo" in src:
            assert set(src) == {"repo", "path", "commit"}, name
            assert len(src["commit"]) == 40 and int(src["commit"], 16) >= 0, name
        else:
            assert src == {"file": "paper/cgh-wacv2024.md"}, name
    for config, entries in OFFICIAL["configs"].items():
        assert entries, config
        for key, entry in entries.items():
            assert set(entry) == {"value", "source", "where"}, (config, key)
            assert entry["source"] in sources, (config, key, entry["source"])


@pytest.mark.parametrize("config", sorted(OFFICIAL["configs"]))
def test_shipped_config_resolves_to_the_official_values(config):
    cfg = resolved(config)
    check_config(cfg, 1)
    tree = to_dict(cfg)
    views = view_facts(cfg)
    wrong = {}
    for key, entry in OFFICIAL["configs"][config].items():
        got = views[key] if key.startswith("views.") else _lookup(tree, key)
        if not _same(got, entry["value"]):
            wrong[key] = {"config": got, "official": entry["value"], "source": entry["source"]}
    assert not wrong, wrong


def test_every_global_context_config_trains_with_ressls_own_schedule():
    """ReSSL and Table 5's global-context rows: ReSSL's loss (``ressl``), not CGH's InfoNCE
    warm-up; every other shipped config is a CGH variant with the cross/same loss. Table 7's
    layer4-only rows are CGH (cross-context with a one-layer hypercolumn), not ReSSL."""
    names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in (CONFIG_DIR / "pretrain").rglob("*.yaml"))
    assert "pretrain/ressl_imagenet_r50_200ep" in names and len(names) > 20
    for name in names:
        cfg = resolved(name)
        check_config(cfg, 1)
        is_ressl = cfg.loss.mode == "global"
        assert (cfg.loss.schedule == "ressl") == is_ressl, name
        assert (cfg.method == "ressl") == is_ressl, name
        if name.endswith("layers_4"):
            assert cfg.loss.mode == "cross" and list(cfg.model.layers) == ["layer4"], name


@pytest.mark.parametrize("override, message", [
    ("optim.weight_decay_exempt=authors", "optim.weight_decay_exempt 'authors' unknown; expected one of "
                                          "bn_bias_names, norm_and_bias, none"),
    ("optim.warmup_start=one", "optim.warmup_start 'one' unknown; expected one of zero, one_step"),
    ("model.bn_split_order=random", "model.bn_split_order 'random' unknown; expected one of interleaved, contiguous"),
    ("loss.schedule=ressl", "loss.schedule 'ressl' is ReSSL's objective and needs loss.mode=global"),
])
def test_bad_numerics_options_are_one_line_errors(override, message):
    with pytest.raises(CghError, match=re.escape(message)):
        check_config(resolved("pretrain/imagenet_r50_200ep", override), 1)


# ------------------------------------------------------------------------ weight decay
# Our parameter names -> the authors' (models/cgh.py CGH under DistributedDataParallel): the same
# torchvision ResNet as encoder_q, the global projector as its fc (Linear, ReLU, Linear), the
# hypercolumn branch as FeatDistiller (reg_conv = Conv, BN, ReLU; projector = Linear, ReLU, Linear).
AUTHORS_PREFIX = [("student_backbone.", "module.encoder_q."),
                  ("student_global_head.", "module.encoder_q.fc."),
                  ("student_hyper_head.reduce.", "module.hypercols_proj_q.reg_conv."),
                  ("student_hyper_head.projector.", "module.hypercols_proj_q.projector.")]


def authors_name(ours: str) -> str:
    for mine, theirs in AUTHORS_PREFIX:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    raise AssertionError(f"{ours} has no counterpart in the authors' model")


def exempt_names(model, groups) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    (exempt,) = [g for g in groups if g["weight_decay"] == 0.0]
    return {names[id(p)] for p in exempt["params"]}


@pytest.mark.parametrize("config, hyper", [("pretrain/imagenet_r50_200ep", True),
                                           ("pretrain/ressl_imagenet_r50_200ep", False)])
def test_authors_weight_decay_rule_on_a_resnet50_cgh_model(config, hyper):
    """The shipped ImageNet configs' rule selects exactly what the authors' (and ReSSL's) test
    selects on the authors' names, and differs from the all-1-D rule by exactly the downsample
    BatchNorm weights and the hypercolumn BatchNorm weight (their biases are exempt by name)."""
    cfg = resolved(config, "model.queue_size=256", "model.hidden_dim=64", "model.dim=32")
    torch.manual_seed(0)
    model = build_model(cfg, 1, torch.device("cpu"))
    assert cfg.model.arch == "resnet50" and cfg.optim.weight_decay_exempt == "bn_bias_names"
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.weight_decay_exempt)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("teacher") for n in trainable)     # the teacher has no gradients

    authors = {n for n in trainable if "bn" in authors_name(n) or "bias" in authors_name(n)}
    got = exempt_names(model, groups)
    assert got == authors
    (decayed,) = [g for g in groups if g["weight_decay"] > 0]
    assert decayed["weight_decay"] == 1e-4
    assert len(decayed["params"]) + len(got) == len(trainable)

    one_dim = {n for n, p in trainable.items() if p.ndim <= 1}
    decayed_1d = {f"student_backbone.layer{i}.0.downsample.1.weight" for i in range(1, 5)}
    if hyper:
        decayed_1d.add("student_hyper_head.reduce.1.weight")
    assert one_dim - got == decayed_1d
    assert got <= one_dim
    assert exempt_names(model, param_groups(model, 1e-4, "norm_and_bias")) == one_dim
    # 53 BatchNorms of the ResNet-50 (bn1, 3 per block x 16, 4 downsample), the global projector's
    # 2 biases; with the hypercolumn branch its BN (weight, bias) and its projector's 2 biases
    assert len(one_dim) == 2 * 53 + 2 + (4 if hyper else 0)


def test_decay_everything_is_one_group():
    """``none`` (the authors' code on datasets other than ImageNet): one group, all parameters."""
    cfg = resolved("pretrain/tinyimagenet_r18_400ep", "model.queue_size=256", "model.hidden_dim=64", "model.dim=32")
    model = build_model(cfg, 1, torch.device("cpu"))
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.weight_decay_exempt)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4
    assert len(groups[0]["params"]) == sum(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------ lr warm-up
def authors_lr(epoch: int, i: int, iters_per_epoch: int, base_lr: float, epochs: int, warm_up: int) -> float:
    """The authors' (and ReSSL's) ``adjust_learning_rate``, written out: per iteration
    ``T = epoch * iters + i``; linear from 0 during ``warm_up`` epochs, then half a cosine to 0."""
    t = epoch * iters_per_epoch + i
    if epoch < warm_up:
        return base_lr * t / (warm_up * iters_per_epoch)
    return 0.5 * base_lr * (1 + math.cos((t - warm_up * iters_per_epoch) / ((epochs - warm_up) * iters_per_epoch) * math.pi))


def test_zero_start_warmup_is_the_authors_schedule_at_every_step():
    epochs, iters, warm, peak = 7, 5, 2, 0.4
    for epoch in range(epochs):
        for i in range(iters):
            got = warmup_cosine_lr(epoch * iters + i, epochs * iters, warm * iters, peak, 0.0, "zero")
            assert got == pytest.approx(authors_lr(epoch, i, iters, peak, epochs, warm), abs=1e-12), (epoch, i)


@pytest.mark.parametrize("start, first, second, k", [("zero", 0.0, 0.1, 0.7), ("one_step", 0.1, 0.2, 0.8)])
def test_warmup_values_at_steps_0_1_k(start, first, second, k):
    """Peak 1.0 over 10 warm-up steps: step 0, 1, 7 -> 0, 0.1, 0.7 from zero; 0.1, 0.2, 0.8 one step
    on; both reach the peak at step 10 and follow the same cosine after it (1/2 at mid-way)."""
    lr = lambda step: warmup_cosine_lr(step, 110, 10, 1.0, 0.0, start)   # noqa: E731
    assert [lr(0), lr(1), lr(7)] == pytest.approx([first, second, k])
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(0.5) and lr(110) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warm-up start"):
        warmup_cosine_lr(0, 110, 10, 1.0, 0.0, "half")


def test_train_step_uses_the_configured_warmup_start():
    """The trainer's step sets ``optim.warmup_start``'s lr on every parameter group."""
    tiny = [*PLACES, "model.arch=resnet18", "model.queue_size=32", "optim.batch_size=8", "data.image_size=32",
            "model.bn_splits=2", "model.hidden_dim=16", "model.dim=8"]
    torch.manual_seed(0)
    model = build_model(load_pretrain_config(None, tiny), 1, torch.device("cpu"))
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.0, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    batch = (([torch.randn(8, 3, 32, 32, generator=g)], torch.randn(8, 3, 32, 32, generator=g)),
             torch.arange(8) % 2, torch.arange(8))
    for start in ("zero", "one_step"):
        cfg = load_pretrain_config(None, [*tiny, f"optim.warmup_start={start}"])
        warmup_steps = round(cfg.optim.warmup_epochs * 10)     # 10 steps an epoch below
        for step in (0, 1):
            loss, _ = train_step(model, model, batch, opt, scaler, cfg, step, 100, 10, torch.device("cpu"), 0.05)
            want = 0.05 * (step + (start == "one_step")) / warmup_steps
            assert loss["lr"] == pytest.approx(want), (start, step)
            assert all(group["lr"] == pytest.approx(want) for group in opt.param_groups), (start, step)
