"""The segmentation protocol resolves to the official values (tests/official/segmentation.yaml); one
optimizer step sees the protocol's global batch with any number of processes (split or accumulated),
or the run is refused; accumulation keeps the protocol's lr at every optimizer step, in mmengine's
own scheduler and in a real CPU run; why mmselfsup 1.x's ResNetV1c route is not followed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cgh.config import ConfigError, load_config
from transfer import seg

from _helpers_transfer import assert_sources_pinned, one_thread  # noqa: F401  (fixture)

TABLE = yaml.safe_load((Path(__file__).parent / "official" / "segmentation.yaml").read_text())
VOC, CITY = "transfer/seg_voc12aug_512x512_20k.yaml", "transfer/seg_cityscapes_769x769_40k.yaml"


def _plain(value):
    """mmengine ConfigDicts and tuples as the plain dicts and lists of the YAML table."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _value(node, key: str):
    """``key`` of the table (``a.0``: list index, ``[Type]``: the element of that type, ``*``: each)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part == "*":
            rest = ".".join(parts[i + 1:])
            return [_value(n, rest) if rest else _plain(n) for n in node]
        if part.startswith("["):
            (node,) = [n for n in node if n["type"] == part[1:-1]]
        else:
            node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return _plain(node)


def global_batch(c, processes: int) -> int:
    """Images per optimizer step of a resolved config, from what mmengine reads."""
    return c.train_dataloader.batch_size * processes * c.optim_wrapper.get("accumulative_counts", 1)


def official(name: str) -> dict:
    entry = TABLE["protocols"][name]
    values = dict(official(entry["like"])) if "like" in entry else {}
    return {**values, **entry["values"]}


def resolve(config: str, *overrides: str):
    """The shipped config through the project's builder, for a ResNet-50 on CUDA (nothing is built)."""
    cfg = load_config(seg.Config, config, ["checkpoint=unused.pth", "output_dir=unused_seg_out", *overrides])
    return cfg, seg.build_mmseg_config(cfg, "resnet50", "unused.pth", cuda=True)


def drift(name: str, cfg, c) -> list[str]:
    out = []
    for key, entry in official(name).items():
        got = global_batch(c, cfg.gpus) if key == "global_batch" else _value(c, key)
        if got != entry["value"]:
            out.append(f"{key}: {got!r}, official {entry['value']!r} ({entry['source']})")
    return out


@pytest.mark.parametrize("name", list(TABLE["protocols"]))
def test_shipped_config_resolves_to_the_official_values(name):
    assert drift(name, *resolve(TABLE["protocols"][name]["config"])) == []


def test_a_config_that_drifts_from_the_table_is_caught():
    problems = drift("voc12aug", *resolve(VOC, "global_batch=8", "mmseg.optim_wrapper.optimizer.lr=0.02",
                                          "mmseg.model.data_preprocessor.pad_val=1"))
    assert sorted(p.split(":")[0] for p in problems) == [
        "global_batch", "model.data_preprocessor.pad_val", "optim_wrapper.optimizer"]
    # the raw-pad variant is not the default protocol: its pipeline differs
    rawpad = resolve(TABLE["protocols"]["voc12aug_rawpad"]["config"])
    assert [p.split(":")[0] for p in drift("voc12aug", *rawpad)] == [
        "train_dataloader.dataset.datasets.*.pipeline.*.type"]


def test_every_official_value_cites_a_source_with_its_commit():
    assert_sources_pinned(TABLE, official)


@pytest.mark.parametrize("config, total, per_gpu", [(VOC, 16, 4), (CITY, 8, 2)])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_one_step_sees_the_protocols_global_batch_with_any_gpu_count(config, total, per_gpu, gpus):
    if total % (gpus * per_gpu) == 0:     # accumulate keeps the file's per-GPU batch
        cfg, c = resolve(config, f"gpus={gpus}", "batch_mode=accumulate")
        assert c.train_dataloader.batch_size == per_gpu and global_batch(c, gpus) == total
        assert c.optim_wrapper.accumulative_counts == total // (gpus * per_gpu)
    cfg, c = resolve(config, f"gpus={gpus}")   # split (default): global_batch / gpus per process
    assert cfg.batch_mode == "split" and c.optim_wrapper.accumulative_counts == 1
    assert c.train_dataloader.batch_size * gpus == total == global_batch(c, gpus)
    assert c.cgh_batch == {"mode": "split", "global_batch": total, "processes": gpus,
                           "per_process_batch": total // gpus, "accumulation_steps": 1}
    assert c.launcher == ("pytorch" if gpus > 1 else "none")


@pytest.mark.parametrize("overrides, message", [
    (["gpus=3"], r"config key 'gpus': global_batch=16 images do not split over gpus=3; run with gpus in "
                 r"\(1, 2, 4, 8, 16\), or batch_mode=accumulate"),
    (["gpus=3", "batch_mode=accumulate"], r"accumulate needs gpus x mmseg.train_dataloader.batch_size to "
                                          r"divide global_batch=16, got 3 x 4"),
    (["gpus=8", "batch_mode=accumulate"], r"got 8 x 4"),
    (["mmseg.train_dataloader.batch_size=2"], r"'mmseg.train_dataloader.batch_size': with batch_mode=split"),
    (["batch_mode=sum"], r"config key 'batch_mode': expected one of split, accumulate, got 'sum'"),
    (["global_batch=0"], r"config key 'global_batch'"),
])
def test_a_global_batch_the_run_cannot_reach_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        resolve(VOC, *overrides)
    assert "\n" not in str(err.value)


def test_accumulate_stretches_every_iteration_count():
    _, c = resolve(VOC, "batch_mode=accumulate", "mmseg.train_dataloader.batch_size=2")   # 1 GPU x 2 x 8
    assert c.optim_wrapper.accumulative_counts == 8
    assert c.train_cfg.max_iters == 160000 and c.train_cfg.val_interval == 16000
    assert c.default_hooks.checkpoint.interval == 16000 and c.default_hooks.logger.interval == 400
    assert _plain(c.param_scheduler) == [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=7, end=160000,
                                              by_epoch=False)]
    assert c.cgh_batch["accumulation_steps"] == 8 and c.cgh_batch["per_process_batch"] == 2
    with pytest.raises(ConfigError, match="accumulate rescales iteration-based PolyLR"):
        resolve(VOC, "batch_mode=accumulate", "mmseg.param_scheduler.0.type=CosineAnnealingLR")


def _lr_at_optimizer_steps(c) -> list[float]:
    """mmengine's own schedulers built from ``c`` and stepped as ParamSchedulerHook does (after every
    iteration): the lr of each iteration at which OptimWrapper steps the optimizer."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS

    steps = c.optim_wrapper.accumulative_counts
    wrapper = OptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01),
                           accumulative_counts=steps)
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in _plain(c.param_scheduler)]
    out = []
    for it in range(c.train_cfg.max_iters):
        if (it + 1) % steps == 0:           # OptimWrapper.should_update: _inner_count % counts == 0
            out.append(wrapper.param_groups[0]["lr"])
            wrapper.step()
        for s in schedulers:
            s.step()
    return out


# With accumulation the schedulers step after iterations without an optimizer step; mmengine warns
# about that order (a torch habit); the lr at every optimizer step is what these tests check.
STEP_ORDER_WARNING = "ignore:Detected call of `scheduler.step\\(\\)` before:UserWarning"


@pytest.mark.filterwarnings(STEP_ORDER_WARNING)
def test_accumulated_steps_get_the_protocols_lr_in_mmengines_scheduler():
    short = ["mmseg.train_cfg.max_iters=60", "mmseg.param_scheduler.0.end=60"]
    protocol = _lr_at_optimizer_steps(resolve(VOC, *short)[1])
    for gpus in (1, 2):
        accumulated = _lr_at_optimizer_steps(resolve(VOC, *short, f"gpus={gpus}", "batch_mode=accumulate")[1])
        assert accumulated == pytest.approx(protocol, rel=1e-12, abs=0)
    assert len(protocol) == 60 and protocol[0] == 0.01 and protocol[-1] == pytest.approx(1e-4)


@pytest.mark.filterwarnings(STEP_ORDER_WARNING)
def test_accumulate_steps_the_optimizer_every_n_iterations_in_a_real_run(random_ckpt, synth_root, tmp_path,
                                                                        one_thread):
    """A CPU run of the synth config, 1 process x 2 images x 2 accumulated = its global batch of 4,
    3 optimizer steps: the weights change only at iterations 1, 3, 5, each time with the lr of the
    protocol's poly schedule (hand-written) at that step."""
    import mmseg.utils
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    from mmseg.registry import HOOKS

    from transfer.convert import save_mmseg
    from transfer.hub import load_backbone

    seen = []

    @HOOKS.register_module(force=True)
    class CghTestStepRecorder(Hook):
        priority = "HIGHEST"     # before ParamSchedulerHook moves the lr on

        def before_train(self, runner):
            self.last = runner.model.decode_head.conv_seg.weight.detach().clone()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            weight = runner.model.decode_head.conv_seg.weight.detach()
            seen.append((batch_idx, not torch.equal(weight, self.last),
                         runner.optim_wrapper.optimizer.param_groups[0]["lr"]))
            self.last = weight.clone()

    out = tmp_path / "run"
    cfg = load_config(seg.Config, "transfer/seg_synth.yaml", [
        f"checkpoint={random_ckpt}", f"data_root={synth_root / 'VOCdevkit' / 'VOC2012'}", f"output_dir={out}",
        "batch_mode=accumulate", "mmseg.train_dataloader.batch_size=2", "mmseg.train_cfg.max_iters=3",
        "mmseg.param_scheduler.0.end=3"])
    ck = load_backbone(cfg.checkpoint)
    out.mkdir()
    weights = save_mmseg(ck.state_dict, out / "backbone_mmseg.pth")
    c = seg.build_mmseg_config(cfg, ck.arch, weights, cuda=False)
    assert c.cgh_batch == {"mode": "accumulate", "global_batch": 4, "processes": 1, "per_process_batch": 2,
                           "accumulation_steps": 2}
    c.custom_hooks.append(dict(type="CghTestStepRecorder"))
    c.default_hooks.checkpoint.save_last = False      # (time: nothing here reads a checkpoint)
    mmseg.utils.register_all_modules(init_default_scope=True)
    seg.register_mmseg_extensions()
    Runner.from_cfg(c).train()

    assert [i for i, _, _ in seen] == list(range(6))
    assert [i for i, stepped, _ in seen if stepped] == [1, 3, 5]
    base, eta_min = 0.02, 1e-4       # the synth config's lr and PolyLR(power 0.9, end 3)
    expected = [(base - eta_min) * (1 - j / 2) ** 0.9 + eta_min for j in range(3)]
    assert [lr for _, stepped, lr in seen if stepped] == pytest.approx(expected, rel=1e-9)


def test_mmselfsup_1x_resnetv1c_route_is_not_followed():
    """mmselfsup 1.x runs mmseg's own config (ResNetV1c, pretrained='open-mmlab://resnet50_v1c') with
    its launch script's init_cfg: mmseg 1.2.2 refuses that combination, and a torchvision-layout
    checkpoint has nothing for the deep stem, while mmseg's ResNet takes every tensor of it."""
    import mmseg
    from mmengine.config import Config as MMConfig
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from cgh.backbone import backbone_state_dict, build_backbone

    register_all_modules()
    shipped_configs = Path(mmseg.__file__).parent / ".mim" / "configs"      # mmsegmentation 1.2.2's own
    c = MMConfig.fromfile(str(shipped_configs / "fcn" / "fcn_r50-d8_4xb4-20k_voc12aug-512x512.py"))
    assert c.model.backbone.type == "ResNetV1c" and c.model.pretrained == "open-mmlab://resnet50_v1c"
    # tools/benchmarks/mmsegmentation/mim_dist_train.sh (mmselfsup 1.x) adds these --cfg-options
    c.merge_from_dict({"model.backbone.init_cfg.type": "Pretrained", "model.backbone.init_cfg.checkpoint": "x.pth",
                       "model.backbone.init_cfg.prefix": "backbone."})
    with pytest.raises(AssertionError, match="init_cfg and pretrained cannot be setting at the same time"):
        MODELS.build(c.model)

    def names(module):
        return {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}

    torchvision_layout = set(backbone_state_dict(build_backbone("resnet18")))
    deep_stem = {k for k in names(MODELS.build(dict(type="ResNetV1c", depth=18))) if k.startswith("stem.")}
    assert deep_stem and not deep_stem & torchvision_layout              # the deep stem would stay random
    assert names(MODELS.build(dict(type="ResNet", depth=18))) == torchvision_layout   # filled completely
