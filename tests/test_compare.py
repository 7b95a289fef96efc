"""``cgh compare``: runs a suite on several checkpoints, resumes by skipping finished runs, ranks them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cgh.backbone import backbone_state_dict, build_backbone
from cgh.canonical import save_canonical
from cgh.cli import main as cgh_main
from cgh.config import ConfigError
from cgh.errors import CghError
from cgh.protocols import load_protocol_config
from cgh.records import read_record
from reports import compare as compare_mod
from reports.compare import compare, load_suite

SUITE = """
description: test suite (kNN and the fast linear probe on a tiny synthshapes root)
runs:
  - name: knn
    protocol: knn
    overrides: [dataset=synthshapes, "data_root={data_root}", resize=32, crop=32, batch_size=50,
                num_workers=0, device=cpu, "ks=[%s]", "cache_dir={work_dir}/cache"]
  - name: linear_fast
    protocol: linear
    overrides: [fast=true, dataset=synthshapes, "data_root={data_root}", resize=32, crop=32, batch_size=50,
                num_workers=0, device=cpu, epochs=5, lr=0.1, "cache_dir={work_dir}/cache"]
"""


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    from cgh.data.synth import generate

    root = tmp_path_factory.mktemp("synth_compare")
    generate(root, seed=0, num_classes=10, train_per_class=12, val_per_class=4, image_size=32,
             det_train=1, det_test=1, det_image_size=48)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two random ResNet-18s (canonical) and the first one re-saved in MoCo's layout."""
    d = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_canonical(backbone_state_dict(build_backbone("resnet18")), d / f"rand{seed}.safetensors",
                                    method="random-init"))
    from safetensors.torch import load_file
    sd = load_file(str(paths[0]))
    moco = {"epoch": 3, "arch": "resnet18", "optimizer": {},
            "state_dict": {**{f"module.encoder_q.{k}": v for k, v in sd.items()},
                           **{f"module.encoder_k.{k}": v.clone() for k, v in sd.items()},
                           "module.encoder_q.fc.0.weight": torch.zeros(512, 512),
                           "module.queue": torch.zeros(128, 64)}}
    torch.save(moco, d / "rand0_moco.pth.tar")
    return paths + [d / "rand0_moco.pth.tar"]


def write_suite(path: Path, ks: str = "5,10") -> Path:
    path.write_text(SUITE % ks)
    return path


def test_compare_runs_once_then_skips_everything_and_ranks(tmp_path, tiny_synth, checkpoints, monkeypatch, capsys):
    suite = write_suite(tmp_path / "suite.yaml")
    work = tmp_path / "work"
    first = compare(checkpoints, str(suite), work, str(tiny_synth), log=lambda m: None)
    assert [o.status for o in first] == ["ran"] * 6
    records = {(o.run, Path(o.checkpoint).name): read_record(o.record) for o in first}
    mtimes = {o.record: o.record.stat().st_mtime_ns for o in first}
    # the folder is a function of (run, checkpoint sha256, resolved config)
    sha = hashlib.sha256(checkpoints[0].read_bytes()).hexdigest()
    assert first[0].record.parent.parent == work / "runs" / "knn"
    assert first[0].record.parent.name.startswith(sha[:16] + "-")
    # the MoCo-layout copy holds the same weights: the hub reads it, and the numbers are identical
    assert records[("knn", "rand0_moco.pth.tar")]["checkpoint"]["layout"] == "moco"
    assert records[("knn", "rand0_moco.pth.tar")]["metrics"] == records[("knn", "rand0.safetensors")]["metrics"]
    assert records[("knn", "rand0.safetensors")]["metrics"] != records[("knn", "rand1.safetensors")]["metrics"]

    # second time: no protocol runs at all, nothing rewritten
    def must_not_run(*a, **k):
        raise AssertionError("a protocol ran on the second compare")
    import eval.knn, eval.linear
    monkeypatch.setattr(eval.knn, "run", must_not_run)
    monkeypatch.setattr(eval.linear, "run", must_not_run)
    rc = cgh_main(["compare", *map(str, checkpoints), "--suite", str(suite), "--output-dir", str(work),
                   "--data-root", str(tiny_synth)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "0 run(s), 6 skipped (already done), 0 failed" in out
    assert {o.record: o.record.stat().st_mtime_ns for o in first} == mtimes
    # the ranking report: per protocol, every checkpoint, ordered by top-1
    assert "Ranking: kNN on synthshapes" in out and "Ranking: Linear probe (fast, cached features)" in out
    md = (work / "report" / "report.md").read_text()
    assert md.count("rand0_moco") >= 2 and (work / "report" / "report.html").is_file()
    for table in ("rank_knn_synthshapes", "rank_linear_fast_synthshapes"):
        csv = pd.read_csv(work / "report" / "tables" / f"{table}.csv", na_values="-", keep_default_na=False)
        assert len(csv) == 3 and list(csv["top1 ours"]) == sorted(csv["top1 ours"], reverse=True)
        # competition ranking: 1 + the number of strictly better rows, so the same weights in two
        # layouts (equal scores) share a rank
        scores = list(csv["top1 ours"])
        assert list(csv["Rank"]) == [1 + sum(o > s for o in scores) for s in scores]
        ranks = dict(zip(csv["Checkpoint"], csv["Rank"]))
        assert ranks["rand0"] == ranks["rand0_moco"]

    # a narrower comparison in the same folder reports what it asked for, not everything there
    rc = cgh_main(["compare", str(checkpoints[1]), "--suite", str(suite), "--output-dir", str(work),
                   "--data-root", str(tiny_synth), "--only", "knn"])
    out = capsys.readouterr().out
    assert rc == 0 and "Ranking: kNN on synthshapes" in out and "Linear probe" not in out
    tables = sorted(p.name for p in (work / "report" / "tables").glob("rank_*.csv"))
    assert tables == ["rank_knn_synthshapes.csv"]
    csv = pd.read_csv(work / "report" / "tables" / "rank_knn_synthshapes.csv", na_values="-", keep_default_na=False)
    assert list(csv["Checkpoint"]) == ["rand1"] and list(csv["Rank"]) == [1]


def test_changed_settings_rerun_only_what_changed(tmp_path, tiny_synth, checkpoints):
    suite = write_suite(tmp_path / "suite.yaml")
    work = tmp_path / "work"
    compare(checkpoints[:1], str(suite), work, str(tiny_synth), only=["knn"], log=lambda m: None)
    write_suite(suite, ks="3,5")                                   # a new k list is a new run
    again = compare(checkpoints[:1], str(suite), work, str(tiny_synth), log=lambda m: None)
    assert [(o.run, o.status) for o in again] == [("knn", "ran"), ("linear_fast", "ran")]
    assert len(list((work / "runs" / "knn").iterdir())) == 2
    assert read_record(again[0].record)["metrics"]["best_k"] in (3, 5)


def test_a_failing_run_is_recorded_and_the_others_continue(tmp_path, tiny_synth, checkpoints):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.replace('"data_root={data_root}", resize=32, crop=32, batch_size=50,\n                num_workers=0, device=cpu, "ks=[%s]"',
                                   '"data_root={data_root}/missing", resize=32, crop=32, batch_size=50,\n                num_workers=0, device=cpu, "ks=[5]"'))
    outcomes = compare(checkpoints[:1], str(suite), tmp_path / "work", str(tiny_synth), log=lambda m: None)
    assert [o.status for o in outcomes] == ["failed", "ran"]
    assert (outcomes[0].record.parent / "error.txt").is_file() and not outcomes[0].record.exists()


def test_bad_suites_and_inputs_are_clear_errors(tmp_path, tiny_synth, checkpoints):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  - {name: a, protocol: knnn}\n")
    with pytest.raises(CghError, match="unknown protocol 'knnn'"):
        load_suite(str(bad))
    bad.write_text("runs:\n  - {name: a, protocol: knn}\n  - {name: a, protocol: linear}\n")
    with pytest.raises(ConfigError, match="repeated: a"):
        load_suite(str(bad))
    bad.write_text("runs:\n  - {name: a, protocl: knn}\n")
    with pytest.raises(ConfigError, match="protocl"):
        load_suite(str(bad))
    with pytest.raises(ConfigError, match="config file not found: suites/nosuch"):
        load_suite("nosuch")
    suite = write_suite(tmp_path / "suite.yaml")
    with pytest.raises(CghError, match="needs a data root"):
        compare(checkpoints[:1], str(suite), tmp_path / "w", "", log=lambda m: None)
    with pytest.raises(CghError, match="checkpoint not found: .*nope.pth"):
        compare([tmp_path / "nope.pth"], str(suite), tmp_path / "w", str(tiny_synth), log=lambda m: None)
    with pytest.raises(CghError, match="not in suite"):
        compare(checkpoints[:1], str(suite), tmp_path / "w", str(tiny_synth), only=["seg"], log=lambda m: None)


@pytest.mark.parametrize("name", ["demo", "quick", "full"])
def test_shipped_suites_resolve_against_their_protocols(name):
    suite = load_suite(name)
    for entry in suite.runs:
        overrides = compare_mod._fill(entry.overrides, "/data", Path("/work"), entry.name)
        cfg = load_protocol_config(entry.protocol, entry.config or None,
                                   overrides + ["checkpoint=/c.pth", "output_dir=/o"])
        assert cfg.checkpoint == "/c.pth"


def test_data_root_means_the_folder_of_the_datasets_in_every_imagenet_suite():
    """--data-root is one thing: the folder holding imagenet/, VOCdevkit/, coco/ (it used to be the
    ImageNet folder itself for `quick` and its parent for `full`)."""
    for name in ("quick", "full"):
        for entry in load_suite(name).runs:
            overrides = compare_mod._fill(entry.overrides, "/D", Path("/work"), entry.name)
            cfg = load_protocol_config(entry.protocol, entry.config or None,
                                       overrides + ["checkpoint=/c.pth", "output_dir=/o"])
            roots = [str(cfg[k]) for k in ("data_root", "voc_root", "coco_root") if k in cfg and cfg[k]]
            assert roots and all(r.split("/")[2] in ("imagenet", "VOCdevkit", "coco") for r in roots), (name, roots)


def test_demo_writes_a_moco_layout_the_hub_reads_back_exactly(tmp_path):
    from reports.demo import moco_layout, random_init
    from transfer.hub import load_backbone

    src = random_init(tmp_path / "random_init.safetensors")
    moco = moco_layout(src, tmp_path / "moco.pth.tar")
    raw = torch.load(moco, weights_only=True)
    assert {"epoch", "arch", "state_dict", "optimizer"} <= set(raw)
    assert "module.queue" in raw["state_dict"] and "module.encoder_k.conv1.weight" in raw["state_dict"]
    a, b = load_backbone(src), load_backbone(moco)
    assert b.layout == "moco" and a.arch == b.arch == "resnet18"
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_demo_refuses_synthshapes_from_an_older_generator(tmp_path):
    """An earlier demo's data (older format) is not silently reused under a newer generator."""
    from cgh.data.synth import MANIFEST
    from cgh.errors import DatasetError
    from reports.demo import synth_data

    root = tmp_path / "demo_out" / "synthshapes"
    root.mkdir(parents=True)
    (root / MANIFEST).write_text(json.dumps({"name": "synthshapes", "format_version": 1}))
    with pytest.raises(DatasetError, match=r"format 1, but this version generates format 2; delete .*demo_out"):
        synth_data(root)
