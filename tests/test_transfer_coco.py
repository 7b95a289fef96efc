"""`cgh transfer coco` end to end on the synthshapes COCO set: box and mask AP from detectron2's COCO
evaluator (pycocotools path) land in a valid record; bad input fails before training."""
from __future__ import annotations

import json
import shutil

import pytest

from cgh.backbone import ArchError
from cgh.config import load_config
from cgh.errors import DatasetError
from cgh.records import read_record
from transfer import coco
from transfer.detectron2_common import SEED_RESULT

from _helpers_transfer import one_thread, r50_random  # noqa: F401  (fixtures)


def _cfg(ckpt, root, out, *overrides):
    return load_config(coco.Config, "transfer/coco_synth.yaml",
                       [f"checkpoint={ckpt}", f"coco_root={root}", f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def coco_run(pretrained_ckpt, synth_root, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("coco_run")
    return out, read_record(coco.run(_cfg(pretrained_ckpt, synth_root / "coco", out)))


def test_coco_mask_rcnn_records_box_and_mask_ap(coco_run, synth_root):
    tmp_path, rec = coco_run
    m = rec["metrics"]
    assert rec["protocol"] == "coco_instseg" and rec["dataset"]["split"] == "val2017"
    seed = json.loads((tmp_path / "seed0" / SEED_RESULT).read_text())
    for task in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75"):
            assert m[f"{task}_{k}"] == pytest.approx(seed["evaluator"][task][k])
    assert "MASK_ON: true" in (tmp_path / "seed0" / "detectron2_config.yaml").read_text()
    # The evaluator's own output: the COCO-format detections it scored with pycocotools.
    assert (tmp_path / "seed0" / "inference" / "coco_instances_results.json").is_file()
    assert rec["extra"]["classes"] == json.loads((synth_root / "synthshapes.json").read_text())["detection"]["classes"]
    assert rec["extra"]["seeds"] == 1 and rec["extra"]["batch_scaling"]["mode"] == "none"


def test_coco_mask_rcnn_learns_from_the_pretrained_backbone(coco_run):
    # An untrained head scores bbox/segm AP50 ~0.2 here (measured after 5 iterations).
    m = coco_run[1]["metrics"]
    assert m["bbox_AP50"] > 3 and m["segm_AP50"] > 2, m


def test_missing_annotation_file_fails_before_training(synth_root, random_ckpt, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(synth_root / "coco", root)
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DatasetError, match=r"annotations[/\\]instances_val2017\.json"):
        coco.run(_cfg(random_ckpt, root, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wrong_depth_fails_before_training(synth_root, r50_random, tmp_path):
    with pytest.raises(ArchError, match=r"resnet50 \(depth 50\) but the config asks for depth 18"):
        coco.run(_cfg(r50_random, synth_root / "coco", tmp_path / "out", "depth=18"))
    assert not (tmp_path / "out").exists()
