"""Writers: each output loads in its target toolkit with every backbone tensor, bit-identical."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision

from cgh.backbone import backbone_state_dict
from cgh.cli import main as cgh_main
from transfer.convert import (ConvertError, convert_checkpoint, from_detectron2_name, save_detectron2,
                              save_mmseg, save_torchvision, to_detectron2_name)

from _helpers_transfer import moco_detectron2_name


def _random_resnet(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.normal_()
    return model


@pytest.fixture(scope="module")
def r50() -> dict:
    return backbone_state_dict(_random_resnet("resnet50"))


@pytest.fixture(scope="module")
def r18() -> dict:
    return backbone_state_dict(_random_resnet("resnet18", seed=1))


def test_detectron2_names_by_hand():
    assert to_detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert to_detectron2_name("bn1.running_var") == "stem.conv1.norm.running_var"
    assert to_detectron2_name("layer1.0.bn3.bias") == "res2.0.conv3.norm.bias"
    assert to_detectron2_name("layer4.2.conv2.weight") == "res5.2.conv2.weight"
    assert to_detectron2_name("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert to_detectron2_name("layer2.0.downsample.1.running_mean") == "res3.0.shortcut.norm.running_mean"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet101"])
def test_detectron2_names_follow_moco_and_invert_exactly(arch):
    with torch.device("meta"):
        keys = list(backbone_state_dict(getattr(torchvision.models, arch)(weights=None)))
    assert [to_detectron2_name(k) for k in keys] == [moco_detectron2_name(k) for k in keys]
    assert [from_detectron2_name(to_detectron2_name(k)) for k in keys] == keys


def test_torchvision_file_loads_with_only_fc_missing(r50, tmp_path):
    path = save_torchvision(r50, tmp_path / "r50.pth")
    sd = torch.load(path, weights_only=True)
    model = torchvision.models.resnet50(weights=None)
    result = model.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in r50.items())


def test_detectron2_pkl_is_moco_format(r18, tmp_path):
    path = save_detectron2(r18, tmp_path / "r18.pkl")
    with open(path, "rb") as f:
        obj = pickle.load(f)   # our own file, just written: plain pickle of numpy arrays
    assert isinstance(obj["__author__"], str) and obj["matching_heuristics"] is True
    assert set(obj["model"]) == {moco_detectron2_name(k) for k in r18}
    for k, v in r18.items():
        arr = obj["model"][moco_detectron2_name(k)]
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
        assert np.array_equal(arr, v.numpy())
    with pytest.raises(ConvertError, match=r"must end in \.pkl"):
        save_detectron2(r18, tmp_path / "r18.pth")


def test_detectron2_half_precision_is_widened_exactly(r18, tmp_path):
    half = {k: v.to(torch.bfloat16) for k, v in r18.items()}
    path = save_detectron2(half, tmp_path / "bf16.pkl")
    with open(path, "rb") as f:
        arr = pickle.load(f)["model"]["stem.conv1.weight"]
    assert torch.equal(torch.from_numpy(arr).to(torch.bfloat16), half["conv1.weight"])


@pytest.mark.parametrize("fmt,name", [("canonical", "o.safetensors"), ("torchvision", "o.pth"),
                                      ("detectron2", "o.pkl"), ("mmseg", "o.pth")])
def test_convert_round_trip_from_moco(fmt, name, r18, tmp_path):
    src = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 200, "state_dict": {"module.encoder_q." + k: v for k, v in r18.items()}}, src)
    ck, out = convert_checkpoint(src, fmt, tmp_path / name)
    assert ck.layout == "moco" and out.is_file()
    from transfer.hub import load_backbone
    back = load_backbone(out)
    assert back.layout == fmt and set(back.state_dict) == set(r18)
    assert all(torch.equal(back.state_dict[k], v) for k, v in r18.items())
    # only MoCo's layout suggested "moco": a conversion must not turn that guess into a stated method
    assert ck.method_source == "layout" and back.method_source == "layout"
    if fmt == "canonical":
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["method"] == "moco" and meta["epoch"] == 200 and meta["source_sha256"] == ck.sha256


def test_cli_convert(r18, tmp_path, capsys):
    src = tmp_path / "r18.pth"
    torch.save(r18, src)
    assert cgh_main(["convert", str(src), "--to", "detectron2", "-o", str(tmp_path / "d2.pkl")]) == 0
    assert "read back bit-identical" in capsys.readouterr().out
    assert cgh_main(["convert", str(src), "--to", "detectron2", "-o", str(tmp_path / "d2.pth")]) == 2
    assert "must end in .pkl" in capsys.readouterr().err


# ---- the target toolkits themselves -----------------------------------------------------------------

def _detectron2():
    from transfer.compat.detectron2_compat import Detectron2MissingError, import_detectron2
    try:
        return import_detectron2()
    except Detectron2MissingError as e:
        pytest.skip(str(e))


def test_detectron2_checkpointer_loads_every_backbone_weight(r50, tmp_path):
    """R50-C4 as the VOC/COCO protocol builds it: stem..res4 in the backbone, res5 in the ROI head."""
    _detectron2()
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    path = save_detectron2(r50, tmp_path / "r50.pkl")
    cfg = get_cfg()   # detectron2's defaults are the C4 model: res4 features, Res5ROIHeads
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(path))
    expected = {moco_detectron2_name(k): v for k, v in r50.items()}
    seen = set()
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        for prefix in ("backbone.", "roi_heads."):
            short = name[len(prefix):]
            if name.startswith(prefix) and short in expected:
                assert torch.equal(value, expected[short]), name
                seen.add(short)
        if name.startswith("backbone."):
            assert name[len("backbone."):] in expected, f"backbone weight {name} has no pretrained value"
    assert seen == set(expected)   # every source tensor landed, res5 included


def _mmseg_backbones():
    try:
        from mmseg.models.backbones import ResNet, ResNetV1c
    except (ImportError, AssertionError) as e:   # mmseg asserts a compatible mmcv at import
        pytest.skip(f"mmsegmentation not usable here: {e}")
    return ResNet, ResNetV1c


@pytest.mark.parametrize("depth", [18, 50])
def test_mmseg_resnet_loads_through_init_cfg(depth, r18, r50, tmp_path):
    """The segmentation protocol's backbone (mmselfsup benchmark: ResNet D8) via init_cfg Pretrained."""
    ResNet, ResNetV1c = _mmseg_backbones()
    from mmengine.runner import load_checkpoint

    source = r18 if depth == 18 else r50
    path = save_mmseg(source, tmp_path / "mmseg.pth")
    kwargs = dict(depth=depth, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True,
                  norm_cfg=dict(type="BN", requires_grad=True))
    backbone = ResNet(**kwargs, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    loaded = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(loaded) == set(source)
    assert all(torch.equal(loaded[k], v) for k, v in source.items())
    load_checkpoint(ResNet(**kwargs), str(path), strict=True)   # raises on any missing/unexpected key
    # the deep-stem ResNetV1c has stem.* convolutions a torchvision ResNet does not have
    with pytest.raises(RuntimeError, match=r"stem\."):
        load_checkpoint(ResNetV1c(**kwargs), str(path), strict=True)
