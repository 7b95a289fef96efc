"""`cgh transfer voc` end to end on the synthshapes devkit, its record, resume, seeds, and bad input."""
from __future__ import annotations

import json
import shutil
import statistics

import pytest

from cgh import cli
from cgh.backbone import ArchError
from cgh.config import ConfigError, load_config
from cgh.data.synth import generate
from cgh.errors import DatasetError
from cgh.records import read_record
from transfer import voc
from transfer.detectron2_common import SEED_RESULT, aggregate_runs

from _helpers_data import TINY
from _helpers_transfer import one_thread  # noqa: F401  (fixture)


def _cfg(ckpt, root, out, *overrides):
    return load_config(voc.Config, "transfer/voc_synth.yaml",
                       [f"checkpoint={ckpt}", f"voc_root={root / 'VOCdevkit'}", f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def voc_run(pretrained_ckpt, synth_root, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("voc_run")
    return out, voc.run(_cfg(pretrained_ckpt, synth_root, out))


def test_voc_records_the_evaluator_numbers(voc_run, synth_root):
    out, record_path = voc_run
    rec = read_record(record_path)
    assert rec["protocol"] == "voc_det"
    assert rec["dataset"]["split"] == "2007_test" and rec["dataset"]["train_split"] == "2007_trainval+2012_trainval"
    # The record's numbers are the PASCAL VOC evaluator's, unchanged (one seed: mean = run, no std).
    seed = json.loads((out / "seed0" / SEED_RESULT).read_text())
    for m in ("AP", "AP50", "AP75"):
        assert rec["metrics"][m] == pytest.approx(seed["evaluator"]["bbox"][m])
        assert rec["metrics"][f"{m}_std"] is None
    assert rec["extra"]["runs"][0]["metrics"]["AP50"] == rec["metrics"]["AP50"]
    # How the number was produced: one seed (reports mark it), batch 2 unscaled (voc_synth's own schedule).
    assert rec["extra"]["seeds"] == 1 == len(rec["extra"]["runs"])
    assert rec["extra"]["batch_scaling"] == {"mode": "none", "reference_batch": 16, "ims_per_batch": 2,
                                             "factor": 0.125, "scaled": {}}
    assert rec["extra"]["classes"] == sorted(json.loads((synth_root / "synthshapes.json").read_text())["detection"]["classes"])
    assert rec["extra"]["backbone_check"]["ok"] and json.loads((out / "seed0" / "backbone_check.json").read_text())["ok"]


def test_voc_detector_learns_from_the_pretrained_backbone(voc_run):
    # Learning, not just execution: an untrained head scores AP50 ~0.2-0.4 here (measured after
    # 5-20 iterations); 200 iterations at 2 images x 16 ROIs must be clearly above that.
    rec = read_record(voc_run[1])
    assert rec["metrics"]["AP50"] > 3, rec["metrics"]


def test_voc_writes_the_complete_protocol_config(voc_run):
    out, _ = voc_run
    d2 = (out / "seed0" / "detectron2_config.yaml").read_text()
    for line in ("DEPTH: 18", "RES2_OUT_CHANNELS: 64", "NORM: BN", "STRIDE_IN_1X1: false", "FREEZE_AT: 0",
                 "FORMAT: RGB", "NAME: Res5ROIHeadsExtraNorm", "- 58.395", "MAX_ITER: 200"):
        assert line in d2, line
    assert (out / "backbone_detectron2.pkl").is_file() and (out / "config.yaml").is_file()


def test_voc_finished_seed_is_not_retrained_and_interrupted_run_resumes(voc_run, pretrained_ckpt, synth_root, tmp_path,
                                                                      one_thread):
    out, record_path = voc_run
    first = read_record(record_path)["metrics"]
    # Rerun over the finished folder: the seed's result is reused, nothing trains.
    rec = read_record(voc.run(_cfg(pretrained_ckpt, synth_root, out)))
    assert rec["metrics"] == first and rec["wall_time_s"] < 30

    # An interrupted run: detectron2's checkpoint exists but the seed never reported. The rerun
    # resumes from that checkpoint (no training left: it only evaluates) and gets the same numbers.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "seed0" / SEED_RESULT).unlink()
    rec2 = read_record(voc.run(_cfg(pretrained_ckpt, synth_root, copy)))
    seed = json.loads((copy / "seed0" / SEED_RESULT).read_text())
    assert seed["resumed"] is True
    assert rec2["metrics"]["AP50"] == pytest.approx(first["AP50"], abs=1e-6)


def test_record_says_how_many_seeds_ran_and_what_the_batch_scaling_changed(random_ckpt, tmp_path, one_thread):
    """Two seeds of a 3-iteration schedule written for batch 1, run at voc_synth's batch 2 with
    linear scaling: lr x2, iterations, steps and warm-up /2 (rounded as detectron2 rounds)."""
    generate(tmp_path / "tiny", seed=0, **TINY)
    out = tmp_path / "out"
    rec = read_record(voc.run(_cfg(random_ckpt, tmp_path / "tiny", out, "seeds=2", "batch_scaling=linear",
                                   "reference_batch=1", "detectron2.SOLVER.MAX_ITER=3",
                                   "detectron2.SOLVER.STEPS=[2]", "detectron2.SOLVER.WARMUP_ITERS=1",
                                   "detectron2.TEST.PRECISE_BN.NUM_ITER=1")))
    assert rec["extra"]["seeds"] == 2 and [r["seed"] for r in rec["extra"]["runs"]] == [0, 1]
    assert rec["metrics"]["AP50_std"] is not None
    scaling = rec["extra"]["batch_scaling"]
    assert [scaling[k] for k in ("mode", "reference_batch", "ims_per_batch", "factor")] == ["linear", 1, 2, 2.0]
    assert scaling["scaled"]["SOLVER.BASE_LR"] == [0.02, 0.04]
    assert scaling["scaled"]["SOLVER.MAX_ITER"] == [3, 2] and scaling["scaled"]["SOLVER.STEPS"] == [[2], [1]]
    for seed in (0, 1):
        # The trainer ran the scaled schedule and did not scale it again: 2 iterations (0 and 1).
        rows = [json.loads(line) for line in (out / f"seed{seed}" / "metrics.json").read_text().splitlines()]
        assert max(r["iteration"] for r in rows) == 1
        assert rows[-1]["lr"] == pytest.approx(0.04 * 0.1)   # iteration 1: past the scaled step (unscaled: 0.02)


def test_aggregate_runs_is_mean_and_sample_std():
    runs = [{"metrics": {"AP": a, "AP50": b}} for a, b in ((50.0, 70.0), (52.0, 71.0), (57.0, 75.5))]
    agg = aggregate_runs(runs)
    assert agg["AP"] == pytest.approx(statistics.mean([50, 52, 57]))
    assert agg["AP_std"] == pytest.approx(statistics.stdev([50, 52, 57]))
    assert agg["AP50_std"] == pytest.approx(statistics.stdev([70, 71, 75.5]))


def test_missing_voc_year_fails_before_training(synth_root, random_ckpt, tmp_path):
    root = tmp_path / "VOCdevkit"
    shutil.copytree(synth_root / "VOCdevkit" / "VOC2007", root / "VOC2007")
    cfg = load_config(voc.Config, "transfer/voc_synth.yaml",
                      [f"checkpoint={random_ckpt}", f"voc_root={root}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(DatasetError, match=r"VOC2012[/\\]JPEGImages"):
        voc.run(cfg)
    assert not (tmp_path / "out").exists()


def test_wrong_depth_fails_before_training(synth_root, random_ckpt, tmp_path):
    with pytest.raises(ArchError, match=r"resnet18 \(depth 18\) but the config asks for depth 50"):
        voc.run(_cfg(random_ckpt, synth_root, tmp_path / "out", "depth=50"))
    assert not list((tmp_path / "out").glob("seed*"))


def test_unknown_class_names_fail_before_training(synth_root, random_ckpt, tmp_path):
    # The 20 PASCAL classes do not include the synthetic shapes.
    with pytest.raises(DatasetError, match="not in the class list"):
        voc.run(_cfg(random_ckpt, synth_root, tmp_path / "out", "classes=voc"))


@pytest.mark.parametrize("overrides, message", [
    (["num_machines=2", "machine_rank=2", "dist_url=tcp://10.0.0.1:29500"], "'machine_rank' must be < num_machines"),
    (["num_machines=2", "machine_rank=1"], "explicit dist_url"),
    (["gpus=2"], "but the run is on CPU"),
    (["num_machines=2", "dist_url=tcp://10.0.0.1:29500"], "but the run is on CPU"),
])
def test_bad_launch_settings_fail_before_training(synth_root, random_ckpt, tmp_path, overrides, message):
    """detectron2's launcher needs CUDA for more than one process, and several machines need
    machine 0's address: each mistake is named before any data is read or weights written."""
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=message):
        voc.run(_cfg(random_ckpt, synth_root, out, "device=cpu", *overrides))
    assert not out.exists()


def test_cli_prints_one_line_error(synth_root, random_ckpt, tmp_path, capsys):
    code = cli.main(["transfer", "voc", "--config", "transfer/voc_synth.yaml", "--checkpoint", str(random_ckpt),
                     "--voc-root", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o"), "--seeds", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "VOC data missing" in err and str(tmp_path / "nowhere") in err
