"""Foundation: config validation, atomic result records, canonical checkpoints, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from cgh.backbone import ArchError, backbone_state_dict, build_backbone, infer_arch, load_backbone_weights
from cgh.canonical import load_canonical, save_canonical, sidecar_path
from cgh.config import ConfigError, load_config, save_config
from cgh.io import atomic_write_json, sha256_file
from cgh.records import RecordError, read_record, validate_record, write_record


@dataclass
class Optim:
    lr: float = 0.05
    epochs: int = 200


@dataclass
class Schema:
    name: str = "x"
    optim: Optim = field(default_factory=Optim)
    layers: list = field(default_factory=lambda: ["layer3", "layer4"])


def test_config_layers_base_file_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\noptim:\n  lr: 0.1\n  epochs: 10\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  epochs: 20\n")
    cfg = load_config(Schema, tmp_path / "child.yaml", ["optim.lr=0.3", "layers=[layer4]"])
    assert cfg.name == "base" and cfg.optim.lr == 0.3 and cfg.optim.epochs == 20
    assert list(cfg.layers) == ["layer4"]
    saved = save_config(cfg, tmp_path / "run")
    assert "lr: 0.3" in saved.read_text()


def test_config_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(Schema, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="optim.momentum"):
        load_config(Schema, None, ["optim.momentum=0.9"])


def test_config_wrong_type_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="optim.epochs"):
        load_config(Schema, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(Schema, None, ["optim.lr=fast"])


def test_config_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(Schema, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Schema, None, ["optim.lr"])


def _record_args(**over):
    args = dict(protocol="knn", checkpoint={"path": "a", "sha256": "0" * 64, "method": "cgh", "arch": "resnet18"},
                dataset={"name": "synthshapes", "split": "val"}, metrics={"top1": 50.0},
                config={"k": 20}, started="2026-01-01T00:00:00+00:00", wall_time_s=1.5)
    args.update(over)
    return args


def test_record_roundtrip_and_schema(tmp_path):
    path = write_record(tmp_path, **_record_args())
    rec = read_record(path)
    assert rec["schema_version"] == 1 and rec["metrics"] == {"top1": 50.0}
    assert rec["environment"]["torch"] == torch.__version__
    bad = dict(rec)
    del bad["metrics"]
    with pytest.raises(RecordError, match="metrics"):
        validate_record(bad)
    with pytest.raises(RecordError, match="top1"):
        write_record(tmp_path / "b", **_record_args(metrics={"top1": "high"}))
    (tmp_path / "foreign.json").write_text("[1, 2]")
    with pytest.raises(RecordError, match="not a JSON object"):
        read_record(tmp_path / "foreign.json")


def test_record_write_is_atomic_under_crash(tmp_path):
    """A process killed in the middle of writing leaves the previous record intact."""
    path = write_record(tmp_path, **_record_args())
    before = path.read_bytes()
    script = f"""
import os, json, cgh.io
real_dumps = json.dumps
def dying_dumps(*a, **k):
    s = real_dumps(*a, **k)
    os._exit(9)  # crash after the temp file exists but before rename
cgh.io.json.dumps = dying_dumps
from cgh.records import write_record
write_record({str(tmp_path)!r}, protocol="knn", checkpoint={{"path": "a", "sha256": "1", "method": "m", "arch": "resnet18"}},
             dataset={{"name": "d", "split": "val"}}, metrics={{"top1": 99.0}}, config={{}}, started="t", wall_time_s=1)
"""
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == 9
    assert path.read_bytes() == before
    assert read_record(path)["metrics"]["top1"] == 50.0


def test_atomic_write_leaves_no_temp_on_error(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"a": object.__new__(type("T", (), {"__str__": None}))})
    assert not any(p.name.startswith(".x.json") for p in tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_canonical_roundtrip_is_bit_exact(tmp_path, arch):
    model = build_backbone(arch)
    sd = backbone_state_dict(model)
    path = save_canonical(sd, tmp_path / "backbone.safetensors", method="cgh", epoch=3,
                          train_config={"loss_mode": "cross"}, source_sha256="ab" * 32)
    tensors, meta = load_canonical(path)
    assert set(tensors) == set(sd) and all(torch.equal(tensors[k], sd[k]) for k in sd)
    assert meta["arch"] == arch and meta["epoch"] == 3 and meta["method"] == "cgh"
    assert meta["sha256"] == sha256_file(path)
    assert json.loads(sidecar_path(path).read_text())["train_config"] == {"loss_mode": "cross"}


def test_infer_arch_and_strict_loading():
    sd18 = backbone_state_dict(build_backbone("resnet18"))
    assert infer_arch(sd18) == "resnet18"
    assert infer_arch(backbone_state_dict(build_backbone("resnet34"))) == "resnet34"
    m50 = build_backbone("resnet50")
    with pytest.raises(ArchError, match="missing"):
        load_backbone_weights(m50, sd18)
    partial = dict(backbone_state_dict(m50))
    partial.pop("layer4.2.conv3.weight")
    with pytest.raises(ArchError, match="layer4.2.conv3.weight"):
        load_backbone_weights(m50, partial)


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "cgh.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("data", "pretrain", "inspect", "convert", "eval", "transfer", "report", "compare"):
        assert f"    {name}" in out.stdout


def test_importing_cgh_changes_no_environment_variable():
    """No import-time side effects: huge pages (THP_MEM_ALLOC_ENABLE) are the user's opt-in."""
    code = "import os, json; before = dict(os.environ); import cgh, cgh.cli; print(json.dumps(dict(os.environ) == before))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "true"
