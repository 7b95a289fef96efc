"""Untrusted checkpoints: nothing in them runs, and broken or wrong files give one clear error."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from cgh.backbone import backbone_state_dict
from cgh.cli import main as cgh_main
from transfer.hub import CheckpointError, inspect_checkpoint, load_backbone
from transfer.safe_load import read_checkpoint


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: the marker file proves whether the code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def small_sd() -> dict:
    torch.manual_seed(0)
    return backbone_state_dict(torchvision.models.resnet18(weights=None))


def _payload_is_live(path: Path, marker: Path) -> None:
    """Control: a plain unpickling of the same bytes really does run the code."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"PK":   # torch zip: the pickle is the data.pkl member
        import zipfile
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    try:
        pickle.loads(data)
    except Exception:
        pass   # persistent ids of torch storages fail after the payload has run
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("kind", ["pth-zip", "pth-legacy", "pth-plain-pickle", "pkl", "pkl-in-numpy-object-array"])
def test_code_in_a_checkpoint_is_refused_and_never_runs(kind, small_sd, tmp_path):
    marker = tmp_path / "code_ran"
    evil = CreatesFile(marker)
    if kind == "pth-zip":
        path = tmp_path / "model.pth"
        torch.save({"state_dict": {"x": evil, **small_sd}}, path)
    elif kind == "pth-legacy":
        path = tmp_path / "model.pth"
        torch.save({"state_dict": {"x": evil, **small_sd}}, path, _use_new_zipfile_serialization=False)
    elif kind == "pth-plain-pickle":
        path = tmp_path / "model.pth"
        path.write_bytes(pickle.dumps({"conv1.weight": np.zeros(3), "x": evil}))
    elif kind == "pkl":
        path = tmp_path / "model.pkl"
        path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.zeros(3)}, "__author__": evil}))
    else:
        path = tmp_path / "model.pkl"
        path.write_bytes(pickle.dumps({"model": {"a": np.array([1, evil], dtype=object)}}))
    if kind != "pth-legacy":   # legacy torch files need torch's own unpickler for their storages
        _payload_is_live(path, marker)
    with pytest.raises(CheckpointError, match=r"refused to load.*'(io|builtins)\.open'"):
        load_backbone(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def test_cli_refuses_with_one_line(small_sd, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    torch.save({"model": CreatesFile(marker)}, tmp_path / "evil.pth")
    assert cgh_main(["inspect", str(tmp_path / "evil.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cgh inspect: error:") and "refused to load" in err and "\n" not in err
    assert not marker.exists()


def test_harmless_metadata_types_are_accepted(small_sd, tmp_path):
    """DINO stores an argparse.Namespace, others numpy scalars/arrays: values, not code."""
    import argparse
    torch.save({**small_sd, "args": argparse.Namespace(lr=0.1), "loss": np.float64(0.5),
                "hist": np.arange(3)}, tmp_path / "ok.pth")
    ck = load_backbone(tmp_path / "ok.pth")
    assert {"args", "loss", "hist"} <= set(ck.ignored)


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["pth", "pth-legacy", "pkl", "safetensors", "empty", "garbage"])
def test_truncated_or_corrupt_files_give_a_clear_error(kind, small_sd, tmp_path):
    from safetensors.torch import save_file

    if kind == "pth":
        path = tmp_path / "a.pth"
        torch.save(small_sd, path)
        _truncate(path)
    elif kind == "pth-legacy":
        path = tmp_path / "a.pth"
        torch.save(small_sd, path, _use_new_zipfile_serialization=False)
        _truncate(path)
    elif kind == "pkl":
        path = tmp_path / "a.pkl"
        path.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in small_sd.items()}}))
        _truncate(path)
    elif kind == "safetensors":
        path = tmp_path / "a.safetensors"
        save_file(small_sd, path)
        _truncate(path)
    elif kind == "empty":
        path = tmp_path / "a.pth"
        path.write_bytes(b"")
    else:
        path = tmp_path / "a.pth"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"(truncated or corrupt|empty file)") as err:
        load_backbone(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "nope.pth")


def test_not_a_resnet_is_named_clearly(tmp_path):
    vit = {"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
           "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    torch.save({"model": vit}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"no ResNet backbone found.*top-level keys: model"):
        load_backbone(tmp_path / "vit.pth")


def test_unsupported_resnet_shape_is_named_clearly(tmp_path):
    """A ResNet-18 without its last block is no ResNet we know: say what was found."""
    sd = backbone_state_dict(torchvision.models.resnet18(weights=None))
    sd = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"do not match a supported ResNet \(blocks per stage \[2, 2, 2, 1\]"):
        load_backbone(tmp_path / "odd.pth")


def test_missing_tensor_fails_loudly_and_inspect_lists_it(small_sd, tmp_path):
    sd = dict(small_sd)
    del sd["layer3.1.bn2.running_var"]
    torch.save({"state_dict": {"module.encoder_q." + k: v for k, v in sd.items()}}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. layer3\.1\.bn2\.running_var\)"):
        load_backbone(tmp_path / "m.pth")
    report = inspect_checkpoint(tmp_path / "m.pth")
    assert not report.ok and report.missing == ["layer3.1.bn2.running_var"]


def test_wrong_shape_fails_loudly(small_sd, tmp_path, capsys):
    """A CIFAR-style stem (3x3 conv1) cannot pose as a torchvision ResNet."""
    sd = dict(small_sd)
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(sd, tmp_path / "cifar.pth")
    with pytest.raises(CheckpointError, match=r"wrong shape: conv1\.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"):
        load_backbone(tmp_path / "cifar.pth")
    assert cgh_main(["inspect", str(tmp_path / "cifar.pth")]) == 1
    out = capsys.readouterr().out
    assert "WRONG SHAPE  conv1.weight: (64, 3, 3, 3) in the file, (64, 3, 7, 7) expected" in out
    assert "NOT LOADABLE" in out


def test_inspect_lists_everything_ignored(small_sd, tmp_path, capsys):
    q = {"module.encoder_q." + k: v for k, v in small_sd.items()}
    torch.save({"epoch": 3, "state_dict": {**q, "module.queue": torch.zeros(4, 8)}, "optimizer": {}},
               tmp_path / "moco.pth")
    assert cgh_main(["inspect", str(tmp_path / "moco.pth")]) == 0
    out = capsys.readouterr().out
    assert "layout      moco" in out and "resnet18  (depth 18)" in out
    assert f"{len(small_sd)} of {len(small_sd)} tensors found" in out
    assert "unused       state_dict/module.queue" in out and "unused       optimizer" in out
    assert cgh_main(["inspect", "--json", str(tmp_path / "moco.pth")]) == 0
    import json
    d = json.loads(capsys.readouterr().out)
    assert d["layout"] == "moco" and d["ok"] and d["missing"] == [] and "state_dict/module.queue" in d["ignored"]
