"""The detection protocols resolve to the official values (tests/official/detection.yaml), VOC runs 5
seeds by default, and a batch other than the protocol's scales lr and schedule as detectron2 does."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from cgh.config import ConfigError, load_config
from transfer import coco, voc
from transfer.compat.detectron2_compat import import_detectron2
from transfer.detectron2_common import DatasetSpec, build_detectron2_config, protocol_config

from _helpers_transfer import assert_sources_pinned

import_detectron2()
from detectron2.engine import DefaultTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TABLE = yaml.safe_load((Path(__file__).parent / "official" / "detection.yaml").read_text())
MODULES = {"voc": voc, "coco": coco}
_DATA = DatasetSpec(train=["unused"], test="unused", classes=["a", "b"], record={})
LOGGER = "transfer.detectron2_common"


def _value(c, key: str):
    for part in key.split("."):
        c = c[part]
    return list(c) if isinstance(c, (tuple, list)) else c


def official(name: str) -> dict:
    """The table's values of protocol ``name``, a variant's on top of those it is ``like``."""
    entry = TABLE["protocols"][name]
    values = dict(official(entry["like"])) if "like" in entry else {}
    return {**values, **entry["values"]}


def resolve(name: str, *overrides: str, device: str = "cuda"):
    """The shipped config of ``name`` through the project's builder (nothing built or trained)."""
    entry = TABLE["protocols"][name]
    cfg = load_config(MODULES[entry["protocol"]].Config, entry["config"],
                      ["checkpoint=unused.pth", "output_dir=unused", *overrides])
    return cfg, build_detectron2_config(cfg, "resnet50", "unused.pkl", device, _DATA, "unused", 0)


def drift(name: str, cfg, c) -> list[str]:
    out = []
    for key, entry in official(name).items():
        got = cfg.seeds if key == "seeds" else _value(c, key)
        if got != entry["value"]:
            out.append(f"{key}: {got!r}, official {entry['value']!r} ({entry['source']})")
    return out


@pytest.mark.parametrize("name", list(TABLE["protocols"]))
def test_shipped_config_resolves_to_the_official_values(name):
    assert drift(name, *resolve(name)) == []


def test_a_config_that_drifts_from_the_table_is_caught():
    problems = drift("voc", *resolve("voc", "detectron2.SOLVER.BASE_LR=0.03", "seeds=1",
                                     "detectron2.INPUT.FORMAT=BGR"))
    assert sorted(p.split(":")[0] for p in problems) == ["INPUT.FORMAT", "SOLVER.BASE_LR", "seeds"]


def test_every_official_value_cites_a_source_with_its_commit():
    assert_sources_pinned(TABLE, official)


@pytest.mark.parametrize("name, norm, amp", [
    ("voc", "SyncBN", False), ("voc_naivesyncbn", "naiveSyncBN", False), ("voc_cgh_authors", "SyncBN", True),
    ("coco_1x", "SyncBN", False), ("coco_1x_naivesyncbn", "naiveSyncBN", False),
    ("coco_1x_cgh_authors", "SyncBN", True),
])
def test_named_variants_resolve_to_their_norm_and_amp(name, norm, amp):
    _, c = resolve(name)
    assert (c.MODEL.RESNETS.NORM, c.SOLVER.AMP.ENABLED) == (norm, amp)
    # On CPU both become what runs there: BN (SyncBatchNorm needs CUDA) and fp32 (AMPTrainer too).
    _, c = resolve(name, device="cpu")
    assert (c.MODEL.RESNETS.NORM, c.SOLVER.AMP.ENABLED) == ("BN", False)


def test_voc_runs_five_seeds_by_default_and_coco_one():
    args = ["checkpoint=x.pth", "output_dir=o"]
    assert load_config(voc.Config, None, args).seeds == 5                       # the dataclass
    assert load_config(voc.Config, "transfer/voc_R50_C4_24k.yaml", args).seeds == 5
    assert load_config(voc.Config, "transfer/voc_synth.yaml", args).seeds == 1   # the fast test setting
    assert load_config(coco.Config, None, args).seeds == 1
    assert re.search(r"^SEEDS\s*\?=\s*5\s*$", (ROOT / "Makefile").read_text(), re.M)


@pytest.mark.parametrize("batch, gpus", [(8, 4), (4, 2), (32, 16)])
def test_fewer_gpus_scale_lr_and_schedule_as_detectron2(batch, gpus, caplog):
    """IMS_PER_BATCH=batch gives what detectron2's auto_scale_workers gives for MoCo's config
    (8 GPUs x 2 images) run on `gpus` GPUs at the same images per GPU."""
    _, reference = resolve("voc")
    reference = reference.clone()
    reference.defrost()
    reference.SOLVER.REFERENCE_WORLD_SIZE = 8
    expected = DefaultTrainer.auto_scale_workers(reference, gpus)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, c = resolve("voc", f"detectron2.SOLVER.IMS_PER_BATCH={batch}")
    for key in ("SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.MAX_ITER", "SOLVER.STEPS",
                "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD"):
        assert _value(c, key) == _value(expected, key), key
    # Scaled once, here: the trainer's own auto-scaling (by world size) leaves it as it is.
    assert c.SOLVER.REFERENCE_WORLD_SIZE == 0 and DefaultTrainer.auto_scale_workers(c, gpus) is c
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "linear scaling" in lines[0] and f"SOLVER.BASE_LR 0.02 -> {c.SOLVER.BASE_LR}" in lines[0]


def test_half_batch_is_the_readme_example(caplog):
    # By hand: half the batch, half the lr, twice the iterations, steps and warm-up.
    cfg, c = resolve("voc", "detectron2.SOLVER.IMS_PER_BATCH=8")
    assert (c.SOLVER.BASE_LR, c.SOLVER.MAX_ITER, tuple(c.SOLVER.STEPS), c.SOLVER.WARMUP_ITERS) == (
        0.01, 48000, (36000, 44000), 200)
    _, record = protocol_config(cfg, announce=False)
    assert record["mode"] == "linear" and record["factor"] == 0.5 and record["ims_per_batch"] == 8
    assert record["scaled"]["SOLVER.MAX_ITER"] == [24000, 48000]
    assert record["scaled"]["SOLVER.STEPS"] == [[18000, 22000], [36000, 44000]]


def test_batch_scaling_none_keeps_the_values_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, c = resolve("voc", "batch_scaling=none", "detectron2.SOLVER.IMS_PER_BATCH=8")
    assert (c.SOLVER.IMS_PER_BATCH, c.SOLVER.BASE_LR, c.SOLVER.MAX_ITER, tuple(c.SOLVER.STEPS)) == (
        8, 0.02, 24000, (18000, 22000))
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not scaled" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resolve("voc")                                   # the protocol's own batch: nothing to say
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_bad_batch_scaling_settings_are_one_config_error():
    with pytest.raises(ConfigError, match=r"'batch_scaling': expected one of linear, none, got 'sqrt'"):
        resolve("voc", "batch_scaling=sqrt")
    with pytest.raises(ConfigError, match="REFERENCE_WORLD_SIZE"):     # two scalings at once
        resolve("voc", "detectron2.SOLVER.IMS_PER_BATCH=8", "detectron2.SOLVER.REFERENCE_WORLD_SIZE=4")
    with pytest.raises(ConfigError, match="'reference_batch' must be >= 1"):
        resolve("voc", "reference_batch=0")


def test_bad_batch_scaling_fails_before_anything_is_written(synth_root, random_ckpt, tmp_path):
    cfg = load_config(voc.Config, "transfer/voc_synth.yaml", [
        f"checkpoint={random_ckpt}", f"voc_root={synth_root / 'VOCdevkit'}", f"output_dir={tmp_path / 'o'}",
        "batch_scaling=sqrt"])
    with pytest.raises(ConfigError, match="batch_scaling"):
        voc.run(cfg)
    assert not (tmp_path / "o").exists()
