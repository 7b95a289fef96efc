"""`cgh transfer seg` end to end on the synthshapes VOC2012 masks: mmseg FCN-D8 learns beyond the
all-background baseline, per-class IoU lands in a valid record; the backbone check and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cgh.backbone import ArchError
from cgh.config import load_config
from cgh.errors import DatasetError
from cgh.records import read_record
from transfer import seg
from transfer.backbone_check import BackboneMismatchError, compare_backbone, require_equal_backbone
from transfer.convert import save_mmseg
from transfer.hub import load_backbone

from _helpers_transfer import one_thread  # noqa: F401  (fixture)


def _cfg(ckpt, root, out, *overrides):
    return load_config(seg.Config, "transfer/seg_synth.yaml",
                       [f"checkpoint={ckpt}", f"data_root={root / 'VOCdevkit' / 'VOC2012'}", f"output_dir={out}",
                        *overrides])


def _background_only_miou(voc2012) -> float:
    """mIoU (%) of predicting background everywhere: IoU_bg = bg pixels / labelled pixels, others 0."""
    ids = (voc2012 / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    labels = np.concatenate([np.asarray(Image.open(voc2012 / "SegmentationClass" / f"{i}.png")).ravel() for i in ids])
    labels = labels[labels != 255]
    present = len(np.unique(labels))
    return 100 * float((labels == 0).mean()) / present


@pytest.fixture(scope="module")
def seg_run(pretrained_ckpt, synth_root, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("seg_run")
    return out, read_record(seg.run(_cfg(pretrained_ckpt, synth_root, out)))


def test_seg_records_per_class_iou(seg_run, synth_root):
    manifest = json.loads((synth_root / "synthshapes.json").read_text())
    tmp_path, rec = seg_run
    assert rec["protocol"] == "seg"
    per_class = rec["extra"]["per_class_iou"]
    assert list(per_class) == manifest["segmentation"]["classes"]      # the config's labels = the data's
    # mIoU is the mean of the per-class IoUs that mmseg's metric reports.
    values = [v for v in per_class.values() if v is not None]
    assert rec["metrics"]["mIoU"] == pytest.approx(np.mean(values), abs=0.02)
    assert json.loads((tmp_path / "backbone_check.json").read_text())["ok"]
    dumped = (tmp_path / "mmseg_config.py").read_text()
    assert "depth=18" in dumped and "type='BN'" in dumped and "SyncBN" not in dumped
    # what one optimizer step saw: the synth config's global batch of 4, in one process
    assert rec["extra"]["batch"] == {"mode": "split", "global_batch": 4, "processes": 1,
                                     "per_process_batch": 4, "accumulation_steps": 1}
    assert "cgh_batch = dict(" in dumped and "accumulative_counts=1" in dumped


def test_seg_learns_beyond_background(seg_run, synth_root):
    # Learning, not just execution: beyond predicting background everywhere, and shapes are found.
    rec = seg_run[1]
    values = [v for v in rec["extra"]["per_class_iou"].values() if v is not None]
    baseline = _background_only_miou(synth_root / "VOCdevkit" / "VOC2012")
    assert rec["metrics"]["mIoU"] > baseline + 2, (rec["metrics"], baseline)
    assert max(values[1:]) > 5


def test_seg_backbone_check_fails_when_weights_do_not_load(random_ckpt, synth_root, tmp_path):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    ck = load_backbone(random_ckpt)
    weights = save_mmseg(ck.state_dict, tmp_path / "w.pth")
    c = seg.build_mmseg_config(_cfg(random_ckpt, synth_root, tmp_path), ck.arch, weights, cuda=False)
    model = MODELS.build(c.model)
    ref = torch.load(weights, weights_only=True)["state_dict"]
    with pytest.raises(BackboneMismatchError, match="did not load"):
        require_equal_backbone(compare_backbone(model.backbone.state_dict(), ref, lambda n: n))
    model.init_weights()     # init_cfg=Pretrained: the converted file, loaded by mmengine
    assert compare_backbone(model.backbone.state_dict(), ref, lambda n: n)["ok"]


def test_seg_wrong_depth_and_missing_data_fail_before_training(random_ckpt, synth_root, tmp_path):
    with pytest.raises(ArchError, match=r"resnet18 \(depth 18\) but the config asks for depth 50"):
        seg.run(_cfg(random_ckpt, synth_root, tmp_path / "a", "depth=50"))
    with pytest.raises(DatasetError, match=r"SegmentationClassAug"):
        seg.run(load_config(seg.Config, "transfer/seg_synth.yaml", [
            f"checkpoint={random_ckpt}", f"data_root={synth_root / 'VOCdevkit' / 'VOC2007'}",
            f"output_dir={tmp_path / 'b'}"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class _Crafted:
    """Pickles as ``getattr(target, name)``: what a crafted checkpoint would use to reach attributes."""

    def __init__(self, target, name):
        self.target, self.name = target, name

    def __reduce__(self):
        return getattr, (self.target, self.name)


def test_own_mmengine_checkpoints_load_but_other_getattr_is_refused(tmp_path):
    from mmengine.logging.history_buffer import HistoryBuffer

    buffer = HistoryBuffer()
    for v in (1.0, np.float64(2.0), 4.5):
        buffer.update(v)
    torch.save({"message_hub": {"log_scalars": {"loss": buffer}, "runtime_info": {"x": np.float32(1.5)}},
                "state_dict": {"w": torch.ones(2)}}, tmp_path / "own.pth")
    with pytest.raises(Exception, match="getattr|Unsupported global"):   # needs the allow-list at all
        torch.load(tmp_path / "own.pth", weights_only=True)
    with seg._own_checkpoints_loadable():
        loaded = torch.load(tmp_path / "own.pth", weights_only=True)
    hub = loaded["message_hub"]["log_scalars"]["loss"]
    assert hub.mean() == pytest.approx(7.5 / 3) and hub.max() == 4.5 and hub.statistics("current") == 4.5

    for target, name in ((HistoryBuffer, "__init__"), (np.ndarray, "__subclasses__"), (np.dtype, "__class__")):
        torch.save({"x": _Crafted(target, name)}, tmp_path / "crafted.pth")
        with seg._own_checkpoints_loadable(), pytest.raises(Exception, match="refused"):
            torch.load(tmp_path / "crafted.pth", weights_only=True)


def test_a_mistyped_mmseg_override_is_one_line_before_anything_runs(random_ckpt, synth_root, tmp_path):
    """mmengine adds an unknown key silently (`max_iter` for `max_iters` failed as a TypeError inside
    the runner after ~490 log lines); the override is checked against the config file first."""
    from cgh.config import ConfigError

    out = tmp_path / "o"
    for override, hint in (("mmseg.train_cfg.max_iter=3", "did you mean mmseg.train_cfg.max_iters"),
                           ("mmseg.model.backbone.depht=18", "did you mean mmseg.model.backbone.depth"),
                           ("mmseg.no_such_section.x=1", "under the top level")):
        with pytest.raises(ConfigError, match=hint) as err:
            seg.build_mmseg_config(_cfg(random_ckpt, synth_root, out, override), "resnet18", out / "w.pth", False)
        assert "\n" not in str(err.value)
    # existing keys, list entries included, are fine
    c = seg.build_mmseg_config(_cfg(random_ckpt, synth_root, out, "mmseg.train_cfg.max_iters=3"), "resnet18",
                               out / "w.pth", False)
    assert c.train_cfg.max_iters == 3 and not out.exists()
