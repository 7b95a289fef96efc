"""Every checkpoint layout the hub reads: written the way its project saves it, read back bit-exact.

Each writer below mimics one project's own save call (key prefixes, heads, queues, the second
network, optimizer state, metadata). The backbone's every tensor, BatchNorm statistics included,
is random, and every other network in the file (MoCo's key encoder, DINO's student, our teacher)
holds different values, so reading the wrong tensors or the wrong network cannot pass.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cgh.backbone import backbone_state_dict
from cgh.canonical import save_canonical
from transfer.hub import CheckpointError, load_backbone

from _helpers_transfer import moco_detectron2_name


def _random_resnet(arch: str) -> nn.Module:
    torch.manual_seed(0 if arch == "resnet50" else 1)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.normal_()   # running stats too: a bn1/bn2 or mean/var mix-up changes values
    return model


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return _random_resnet("resnet50")


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return _random_resnet("resnet18")


@pytest.fixture
def ckpt_dir(tmp_path):
    """A ResNet-50 checkpoint is ~100 MB: write it to RAM (/dev/shm) when there is one, else tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="cgh-hub-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def other(sd: dict, value: float) -> dict:
    """Another network with the same keys but different values (one stored element each, so files stay small)."""
    return {k: torch.tensor(value, dtype=v.dtype).expand(v.shape) for k, v in sd.items()}


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def mlp(prefix: str, dims=(8, 4)) -> dict:
    return {f"{prefix}0.weight": torch.randn(dims[0], 3), f"{prefix}0.bias": torch.randn(dims[0]),
            f"{prefix}2.weight": torch.randn(dims[1], dims[0]), f"{prefix}2.bias": torch.randn(dims[1])}


def full_sd(model: nn.Module) -> dict:
    """What ``model.state_dict()`` gives: with ``fc`` and ``num_batches_tracked``, as projects save it."""
    return dict(model.state_dict())


def encoder_with_head(model: nn.Module) -> dict:
    """A ResNet whose ``fc`` was replaced by a projection MLP (MoCo v2, SimSiam, the CGH release)."""
    sd = {k: v for k, v in full_sd(model).items() if not k.startswith("fc.")}
    return {**sd, **mlp("fc.")}


# ---- one writer per layout: (model, directory) -> path ---------------------------------------------

def save_cgh_canonical(model, d):
    return save_canonical(backbone_state_dict(model), d / "backbone.safetensors", method="cgh", epoch=7,
                          train_config={"loss_mode": "cross", "layers": ["layer3", "layer4"]})


def save_cgh_train(model, d):
    """Our trainer's checkpoint: a real CGHModel's state dict saved by cgh.checkpointing."""
    from omegaconf import OmegaConf

    from cgh.checkpointing import save_checkpoint
    from cgh.model import CGHModel
    from cgh.train import PretrainConfig

    arch = "resnet50" if "layer1.0.conv3.weight" in model.state_dict() else "resnet18"
    with torch.device("meta"):   # the real model's keys and shapes, without initialising it
        core = CGHModel(arch=arch, dim=8, hidden_dim=16, hyper_channels=16, queue_size=32)
    sd = other(core.state_dict(), -2.0)   # teacher, heads, queues: values unlike the student's
    sd.update(prefixed("student_backbone.", backbone_state_dict(model)))
    cfg = OmegaConf.to_container(OmegaConf.structured(PretrainConfig(output_dir=str(d))))
    cfg["model"]["arch"] = arch
    state = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "history": [],
             "skipped_images": 0, "config": cfg}
    return save_checkpoint(d, 3, state)


def save_torchvision(model, d):
    torch.save(model.state_dict(), d / "resnet.pth")
    return d / "resnet.pth"


def save_timm_safetensors(model, d):
    """timm / Hugging Face ``model.safetensors``: torchvision key names, fc included, no sidecar."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in full_sd(model).items()}, d / "model.safetensors")
    return d / "model.safetensors"


def save_dino_release(model, d):
    """``dino_resnet50_pretrain.pth``: the teacher backbone, fc removed."""
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, d / "dino_rn50.pth")
    return d / "dino_rn50.pth"


def save_moco(model, d):
    q = encoder_with_head(model)
    sd = {**prefixed("module.encoder_q.", q), **prefixed("module.encoder_k.", other(q, 3.0)),
          "module.queue": torch.randn(4, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}}, d / "checkpoint_0199.pth.tar")
    return d / "checkpoint_0199.pth.tar"


def save_mocov3(model, d):
    q = encoder_with_head(model)
    sd = {**prefixed("module.base_encoder.", q), **prefixed("module.momentum_encoder.", other(q, 3.0)),
          **mlp("module.predictor.")}
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": sd, "optimizer": {}, "scaler": {"scale": 1.0}},
               d / "r-50-100ep.pth.tar")
    return d / "r-50-100ep.pth.tar"


def save_simsiam(model, d):
    sd = {**prefixed("module.encoder.", encoder_with_head(model)), **mlp("module.predictor.")}
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": sd, "optimizer": {}}, d / "checkpoint_0099.pth.tar")
    return d / "checkpoint_0099.pth.tar"


def save_swav_release(model, d):
    sd = {k: v for k, v in full_sd(model).items() if not k.startswith("fc.")}
    sd = {**prefixed("module.", sd), **mlp("module.projection_head."),
          "module.prototypes.weight": torch.randn(30, 4)}
    torch.save(sd, d / "swav_800ep_pretrain.pth.tar")
    return d / "swav_800ep_pretrain.pth.tar"


def save_swav_training(model, d):
    sd = torch.load(save_swav_release(model, d), weights_only=True)
    torch.save({"epoch": 5, "state_dict": sd, "optimizer": {}, "amp": {}}, d / "checkpoint.pth.tar")
    return d / "checkpoint.pth.tar"


def save_dino_full(model, d, teacher_prefix="module.backbone."):
    """DINO's ``checkpoint.pth``: student and teacher (evaluated), heads, loss centre, args Namespace."""
    bb = {k: v for k, v in full_sd(model).items() if not k.startswith("fc.")}
    student = {**prefixed("module.backbone.", other(bb, 5.0)), **mlp("module.head.mlp.")}
    teacher = {**prefixed(teacher_prefix, bb), **mlp(teacher_prefix.replace("backbone", "head") + "mlp.")}
    args = argparse.Namespace(arch="resnet50", out_dim=60000, epochs=800, lr=0.3)
    torch.save({"student": student, "teacher": teacher, "optimizer": {}, "epoch": 800, "args": args,
                "dino_loss": {"center": torch.zeros(1, 60000)}}, d / "checkpoint.pth")
    return d / "checkpoint.pth"


def save_dino_full_nonddp(model, d):
    return save_dino_full(model, d, teacher_prefix="backbone.")


def save_ressl(model, d):
    net = {k: v for k, v in full_sd(model).items() if not k.startswith("fc.")}
    q = {**prefixed("net.", net), **mlp("head.")}
    sd = {**prefixed("module.encoder_q.", q), **prefixed("module.encoder_k.", other(q, 3.0)),
          "module.queue": torch.randn(4, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"model": sd, "optimizer": {}, "epoch": 200}, d / "ressl-imagenet.pth")
    return d / "ressl-imagenet.pth"


def save_cgh_release(model, d):
    q = encoder_with_head(model)
    net = {**prefixed("module.encoder_q.", q), **prefixed("module.encoder_k.", other(q, 3.0)),
           "module.hypercols_proj_q.scale": torch.ones(2),
           "module.hypercols_proj_q.reg_conv.0.weight": torch.randn(4, 6, 1, 1),
           "module.queue": torch.randn(4, 16), "module.queue_hyper": torch.randn(4, 16),
           "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet50", "best_acc1": 0, "net": net, "optimizer0": {}},
               d / "CGH_0199.pth.tar")
    return d / "CGH_0199.pth.tar"


def save_solo_learn(model, d):
    bb = {k: v for k, v in full_sd(model).items() if not k.startswith("fc.")}
    sd = {**prefixed("backbone.", bb), **prefixed("momentum_backbone.", other(bb, 3.0)),
          **mlp("projector."), "classifier.weight": torch.randn(10, 4), "classifier.bias": torch.randn(10)}
    torch.save({"epoch": 399, "global_step": 1000, "pytorch-lightning_version": "2.0.0", "state_dict": sd,
                "loops": {}, "callbacks": {}, "optimizer_states": [{}], "lr_schedulers": [{}],
                "hparams_name": "cfg", "hyper_parameters": {"method": "byol", "backbone": {"name": "resnet50"}}},
               d / "byol-imagenet-epoch=399.ckpt")
    return d / "byol-imagenet-epoch=399.ckpt"


def save_mmselfsup(model, d):
    bb = {k: v for k, v in full_sd(model).items() if not k.startswith("fc.")}
    sd = {**prefixed("backbone.", bb), **mlp("neck.mlp."), "head.loss.weight": torch.ones(1),
          **prefixed("target_backbone.", other(bb, 3.0))}
    torch.save({"meta": {"epoch": 200, "iter": 1000, "mmengine_version": "0.10.7", "cfg": "model = dict(...)"},
                "state_dict": sd, "optimizer": {}, "message_hub": {"log_scalars": {}}}, d / "epoch_200.pth")
    return d / "epoch_200.pth"


def save_vissl(model, d):
    bb = {k: v for k, v in full_sd(model).items() if not k.startswith("fc.")}
    trunk = prefixed("_feature_blocks.", bb)
    heads = {"0.clf.0.weight": torch.randn(10, 4), "0.clf.0.bias": torch.randn(10)}
    torch.save({"phase_idx": 104, "iteration": 5000, "train_phase_idx": 104, "iteration_num": 5000,
                "type": "checkpoint", "loss": {},
                "classy_state_dict": {"train": True, "base_model": {"model": {"trunk": trunk, "heads": heads},
                                                                     "meta": {}},
                                      "optimizer": {}, "num_updates": 5000}},
               d / "model_final_checkpoint_phase104.torch")
    return d / "model_final_checkpoint_phase104.torch"


class LightlyStyleModel(nn.Module):
    """lightly's examples: the ResNet minus fc as an nn.Sequential, plus a projection head."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))


def save_lightly(model, d):
    torch.save(LightlyStyleModel(model).state_dict(), d / "simclr_lightly.pth")
    return d / "simclr_lightly.pth"


def save_lightly_lightning(model, d):
    sd = LightlyStyleModel(model).state_dict()   # a LightningModule's state dict: same keys
    torch.save({"epoch": 10, "global_step": 100, "pytorch-lightning_version": "2.0.0", "state_dict": sd},
               d / "lightly.ckpt")
    return d / "lightly.ckpt"


def save_detectron2_pkl(model, d):
    """What MoCo's converter writes (num_batches_tracked included, as it keeps every key)."""
    newmodel = {moco_detectron2_name(k): v.numpy() for k, v in full_sd(model).items() if not k.startswith("fc.")}
    with open(d / "moco_r50.pkl", "wb") as f:
        pickle.dump({"model": newmodel, "__author__": "MOCO", "matching_heuristics": True}, f)
    return d / "moco_r50.pkl"


def save_detectron2_trained(model, d):
    """A detectron2 R50-C4 training output: stem..res4 under backbone., res5 in the ROI head."""
    bb = {moco_detectron2_name(k): v for k, v in full_sd(model).items()
          if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    sd = {("roi_heads." if k.startswith("res5.") else "backbone.") + k: v for k, v in bb.items()}
    sd.update({"proposal_generator.rpn_head.conv.weight": torch.randn(4, 4, 3, 3),
               "roi_heads.box_predictor.cls_score.weight": torch.randn(21, 4)})
    torch.save({"model": sd, "iteration": 23999}, d / "model_final.pth")
    return d / "model_final.pth"


def save_mmseg(model, d):
    from transfer.convert import save_mmseg as write
    return write(backbone_state_dict(model), d / "mmseg.pth", meta={"method": "cgh"})


def save_timm_train(model, d):
    """timm's train.py checkpoint: the whole model under state_dict, no mmengine 'meta'."""
    path = d / "timm_checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet50", "state_dict": full_sd(model), "optimizer": {}, "version": 2,
                "args": argparse.Namespace(lr=0.1), "metric": 76.1}, path)
    return path


# what the file itself states its method to be (else the hub reports the layout's guess as such)
METHOD_STATED = {"canonical", "cgh-train", "solo-learn", "mmseg"}

# writer, layout the hub must detect, method it must report, entries it must list as ignored
CASES = {
    "canonical": (save_cgh_canonical, "canonical", "cgh", []),
    "cgh-train": (save_cgh_train, "cgh-train", "cgh",
                  ["model/teacher_backbone.conv1.weight", "model/student_global_head.0.weight", "optimizer"]),
    "torchvision": (save_torchvision, "torchvision", "supervised", ["fc.weight", "fc.bias"]),
    "timm-safetensors": (save_timm_safetensors, "torchvision", "supervised", ["fc.weight"]),
    "dino-release": (save_dino_release, "torchvision", "unknown", []),
    "moco": (save_moco, "moco", "moco",
             ["state_dict/module.queue", "state_dict/module.encoder_q.fc.0.weight",
              "state_dict/module.encoder_k.conv1.weight", "optimizer"]),
    "mocov3": (save_mocov3, "mocov3", "mocov3",
               ["state_dict/module.predictor.0.weight", "state_dict/module.momentum_encoder.conv1.weight"]),
    "simsiam": (save_simsiam, "simsiam", "simsiam", ["state_dict/module.predictor.0.weight"]),
    "swav-release": (save_swav_release, "swav", "swav", ["module.prototypes.weight",
                                                         "module.projection_head.0.weight"]),
    "swav-training": (save_swav_training, "swav", "swav", ["state_dict/module.prototypes.weight", "amp"]),
    "dino-full": (save_dino_full, "dino", "dino", ["student", "args", "teacher/module.head.mlp.0.weight"]),
    "dino-full-nonddp": (save_dino_full_nonddp, "dino", "dino", ["student", "teacher/head.mlp.0.weight"]),
    "ressl": (save_ressl, "ressl", "ressl", ["model/module.encoder_q.head.0.weight", "model/module.queue"]),
    "cgh-release": (save_cgh_release, "cgh-release", "cgh",
                    ["net/module.queue_hyper", "net/module.hypercols_proj_q.reg_conv.0.weight"]),
    "solo-learn": (save_solo_learn, "solo-learn", "byol", ["state_dict/projector.0.weight",
                                                          "state_dict/momentum_backbone.conv1.weight"]),
    "mmselfsup": (save_mmselfsup, "mmselfsup", "mmselfsup", ["state_dict/neck.mlp.0.weight", "message_hub"]),
    "vissl": (save_vissl, "vissl", "vissl", ["classy_state_dict/base_model/model/heads", "phase_idx"]),
    "lightly": (save_lightly, "lightly", "lightly", ["projection_head.0.weight"]),
    "lightly-lightning": (save_lightly_lightning, "lightly", "lightly", ["state_dict/projection_head.0.weight"]),
    "detectron2-pkl": (save_detectron2_pkl, "detectron2", "unknown", ["__author__"]),
    "detectron2-trained": (save_detectron2_trained, "detectron2", "unknown",
                           ["model/proposal_generator.rpn_head.conv.weight", "iteration"]),
    "mmseg": (save_mmseg, "mmseg", "cgh", ["meta"]),
    "timm-train": (save_timm_train, "state-dict", "supervised", ["state_dict/fc.weight", "optimizer", "metric"]),
}


def check_read_back(case: str, model: nn.Module, directory: Path) -> None:
    writer, layout, method, ignored = CASES[case]
    ck = load_backbone(writer(model, directory))
    expected = backbone_state_dict(model)
    assert ck.layout == layout
    assert ck.method == method
    assert ck.method_source == ("file" if case in METHOD_STATED else "layout")
    assert ck.arch == ("resnet50" if "layer1.0.conv3.weight" in expected else "resnet18")
    assert set(ck.state_dict) == set(expected)
    for k, v in expected.items():
        got = ck.state_dict[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert torch.equal(got, v), f"{case}: {k} differs"
    assert set(ignored) <= set(ck.ignored), sorted(set(ignored) - set(ck.ignored))
    # the tensors are torchvision's: a torchvision ResNet takes them all, only the classifier is left
    with torch.device("meta"):
        tv = getattr(torchvision.models, ck.arch)(weights=None)
    result = tv.load_state_dict(ck.state_dict, strict=False, assign=True)
    assert {k for k in result.missing_keys if not k.endswith("num_batches_tracked")} == {"fc.weight", "fc.bias"}
    assert not result.unexpected_keys


@pytest.mark.parametrize("case", list(CASES))
def test_resnet50_layout_reads_back_bit_identical(case, resnet50, ckpt_dir):
    check_read_back(case, resnet50, ckpt_dir)


@pytest.mark.parametrize("case", ["moco", "lightly", "vissl", "detectron2-pkl", "cgh-train"])
def test_resnet18_layout_reads_back_bit_identical(case, resnet18, tmp_path):
    check_read_back(case, resnet18, tmp_path)


def test_training_checkpoint_carries_its_config(resnet18, tmp_path):
    model = resnet18
    ck = load_backbone(save_cgh_train(model, tmp_path))
    assert ck.epoch == 3
    assert ck.train_config["arch"] == "resnet18"
    assert ck.train_config["layers"] == ["layer3", "layer4"] and "loss_mode" in ck.train_config


def test_metadata_epochs(resnet18, tmp_path):
    model = resnet18
    assert load_backbone(save_moco(model, tmp_path)).epoch == 200
    assert load_backbone(save_mmselfsup(model, tmp_path)).epoch == 200
    assert load_backbone(save_cgh_canonical(model, tmp_path)).epoch == 7


def test_forced_layout_and_manual_key_prefix(resnet18, tmp_path):
    model = resnet18
    expected = backbone_state_dict(model)
    path = save_moco(model, tmp_path)
    forced = load_backbone(path, fmt="moco")
    assert forced.layout == "moco" and torch.equal(forced.state_dict["layer4.1.bn2.running_var"],
                                                   expected["layer4.1.bn2.running_var"])
    # the key encoder, picked by hand: a different network, so different values
    manual = load_backbone(path, key="state_dict", prefix="module.encoder_k.")
    assert manual.layout == "custom"
    assert torch.all(manual.state_dict["conv1.weight"] == 3.0)
    with pytest.raises(CheckpointError, match="does not hold a vissl checkpoint"):
        load_backbone(path, fmt="vissl")
    with pytest.raises(CheckpointError, match="no key under state_dict starts with 'nothing.'"):
        load_backbone(path, key="state_dict", prefix="nothing.")
    nested = load_backbone(save_vissl(model, tmp_path), key="classy_state_dict/base_model/model/trunk",
                           prefix="_feature_blocks.")
    assert torch.equal(nested.state_dict["layer2.0.downsample.1.weight"], expected["layer2.0.downsample.1.weight"])


def test_unknown_wrapper_found_by_prefix_search(tmp_path):
    """A layout not in the table: the single ResNet inside is found and named 'generic'."""
    model = _random_resnet("resnet18")
    sd = prefixed("module.model.trunk.", full_sd(model))
    torch.save({"weights": sd, "step": 3}, tmp_path / "x.pth")
    ck = load_backbone(tmp_path / "x.pth")
    assert ck.layout == "generic"
    assert torch.equal(ck.state_dict["layer3.1.conv2.weight"], model.state_dict()["layer3.1.conv2.weight"])


def test_two_backbones_need_a_choice(resnet18, tmp_path):
    model = resnet18
    torch.save({"a": prefixed("x.", full_sd(model)), "b": prefixed("y.", full_sd(model))}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match="several ResNet backbones.*--key a --prefix 'x.'"):
        load_backbone(tmp_path / "two.pth")


def test_numpy_arrays_in_pkl_become_equal_tensors(resnet18, tmp_path):
    model = resnet18
    ck = load_backbone(save_detectron2_pkl(model, tmp_path))
    assert all(isinstance(v, torch.Tensor) for v in ck.state_dict.values())
    assert np.array_equal(ck.state_dict["bn1.running_mean"].numpy(), model.state_dict()["bn1.running_mean"].numpy())


def test_cli_lists_every_layout(capsys):
    from cgh.cli import main as cgh_main
    from transfer.layouts import LAYOUTS

    assert cgh_main(["inspect", "--layouts"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [layout.name for layout in LAYOUTS]


@pytest.mark.parametrize("wrap, label", [(lambda sd: sd, "supervised (torchvision)"),
                                         (lambda sd: {"epoch": 90, "arch": "resnet18", "state_dict": sd},
                                          "supervised (timm / PyTorch example)")])
def test_a_plain_state_dict_with_an_imagenet_head_is_labelled_supervised(resnet18, tmp_path, wrap, label):
    """torchvision's and timm's ImageNet classifiers keep their 1000-class fc: the report names them
    "supervised (...)" (a guess from the layout, so never the paper's Supervised row)."""
    from reports.settings import checkpoint_settings

    head = {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "classifier.pth"
    torch.save(wrap({**backbone_state_dict(resnet18), **head}), path)
    ck = load_backbone(path)
    assert (ck.method, ck.method_source) == ("supervised", "layout")
    assert checkpoint_settings(ck.identity()).label == label

    # without the ImageNet head (an SSL backbone, a 10-class fine-tune) nothing is guessed
    torch.save(wrap({**backbone_state_dict(resnet18), "fc.weight": torch.zeros(10, 512)}), path)
    ck = load_backbone(path)
    assert ck.method == "unknown"
    assert checkpoint_settings(ck.identity()).label == f"method unknown ({ck.layout} layout)"
