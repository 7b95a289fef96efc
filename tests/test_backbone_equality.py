"""The pre-training backbone check: passes for a converted checkpoint, fails loudly when weights did
not load (nothing loaded, loaded under the wrong names, or one tensor altered)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cgh.config import load_config
from transfer import voc
from transfer.backbone_check import BackboneMismatchError, compare_backbone
from transfer.compat.detectron2_compat import import_detectron2
from transfer.convert import save_detectron2
from transfer.detectron2_common import (DatasetSpec, build_detectron2_config, register_extra_norm_roi_heads,
                                        verify_detectron2_backbone)
from transfer.hub import load_backbone

from _helpers_transfer import r50_random  # noqa: F401  (fixture)

import_detectron2()
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

_DATA = DatasetSpec(train=["unused"], test="unused", classes=["a", "b", "c"], record={})


def _model(ckpt, tmp_path, config="transfer/detectron2/voc_R_50_C4_24k_moco.yaml"):
    cfg = load_config(voc.Config, None, [f"checkpoint={ckpt}", f"output_dir={tmp_path}",
                                         f"detectron2_config={config}"])
    ck = load_backbone(ckpt)
    weights = save_detectron2(ck.state_dict, tmp_path / "w.pkl")
    c = build_detectron2_config(cfg, ck.arch, weights, "cpu", _DATA, tmp_path, 0)
    register_extra_norm_roi_heads()
    return build_model(c), ck, weights


def test_converted_checkpoint_passes_for_every_backbone_tensor(random_ckpt, tmp_path):
    model, ck, weights = _model(random_ckpt, tmp_path)
    DetectionCheckpointer(model).load(str(weights))
    report = verify_detectron2_backbone(model, ck.state_dict, tmp_path / "report.json")
    # Every tensor of the ResNet-18 (stem..layer3 in the backbone, layer4 in the res5 ROI head)
    # was compared, including BN running statistics.
    assert report["ok"] and report["compared"] == len(ck.state_dict) == report["reference_tensors"]
    sd = model.state_dict()
    assert torch.equal(sd["roi_heads.res5.1.conv2.weight"], ck.state_dict["layer4.1.conv2.weight"])
    assert torch.equal(sd["backbone.stem.conv1.norm.running_var"], ck.state_dict["bn1.running_var"])
    assert (tmp_path / "report.json").is_file()


def test_r50_c4_and_fpn_pass(r50_random, tmp_path):
    for config in ("transfer/detectron2/voc_R_50_C4_24k_moco.yaml",
                   "transfer/detectron2/coco_R_50_FPN_1x_moco.yaml"):
        model, ck, weights = _model(r50_random, tmp_path, config)
        DetectionCheckpointer(model).load(str(weights))
        assert verify_detectron2_backbone(model, ck.state_dict)["compared"] == len(ck.state_dict)


def test_weights_that_did_not_load_fail_loudly(random_ckpt, tmp_path):
    model, ck, _ = _model(random_ckpt, tmp_path)
    with pytest.raises(BackboneMismatchError, match="did not load"):
        verify_detectron2_backbone(model, ck.state_dict, tmp_path / "report.json")

    # A .pkl in torchvision names (not converted): detectron2 loads it without error but matches
    # nothing, so the model keeps its random init.
    raw = tmp_path / "torchvision_names.pkl"
    raw.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in ck.state_dict.items()},
                                  "__author__": "test", "matching_heuristics": True}))
    DetectionCheckpointer(model).load(str(raw))
    with pytest.raises(BackboneMismatchError, match="differ from the checkpoint"):
        verify_detectron2_backbone(model, ck.state_dict)


def test_one_altered_tensor_is_named(random_ckpt, tmp_path):
    model, ck, weights = _model(random_ckpt, tmp_path)
    DetectionCheckpointer(model).load(str(weights))
    with torch.no_grad():
        model.backbone.res3[0].conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(BackboneMismatchError, match=r"1 of \d+ backbone tensors differ.*res3\.0\.conv1\.weight"):
        verify_detectron2_backbone(model, ck.state_dict)


def test_compare_backbone_reports_missing_and_shape():
    ref = {"a.weight": torch.ones(2), "b.weight": torch.ones(3)}
    model = {"m.a.weight": np.ones(2, dtype=np.float32), "m.b.weight": torch.ones(4), "m.c.weight": torch.ones(1)}
    report = compare_backbone(model, ref, lambda n: n[2:])
    assert not report["ok"]
    assert report["mismatched"][0]["problem"] == "shape (4,) vs (3,)"
    assert report["missing_in_checkpoint"] == ["m.c.weight"]
    assert compare_backbone({"m.a.weight": torch.ones(2)}, ref, lambda n: n[2:])["missing_in_model"] == ["b.weight"]
