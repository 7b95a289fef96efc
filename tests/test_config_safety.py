"""Config safety: bounded YAML (alias bombs, huge or foreign files), short error messages, finite
values and declared ranges in every schema, and every shipped config still valid."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cgh.config import CONFIG_DIR, ConfigError, load_config
from cgh.protocols import protocol_module
from cgh.train import PretrainConfig
from reports.compare import load_suite

SECRET = "SECRET-MARKER-7f3a"
# Third-party formats under configs/, read by their own tools, not by load_config.
FOREIGN_DIRS = ("transfer/detectron2/", "transfer/mmseg/")


def _schema(name: str):
    return PretrainConfig if name == "pretrain" else protocol_module(name).Config


def _load(name: str, *overrides: str, path=None):
    """``load_config`` of a schema with placeholders for its required keys (before ``overrides``)."""
    schema = _schema(name)
    required = [f"{k}=x" for k in OmegaConf.missing_keys(OmegaConf.structured(schema))]
    return load_config(schema, path, required + list(overrides))


def _refused(fn, *args, **kwargs) -> str:
    """The one-line ConfigError message ``fn`` raises."""
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def _bomb(levels: int = 9) -> list[tuple[str, str]]:
    """The "billion laughs": level i is a list of 9 aliases of level i-1 (9**levels leaves)."""
    names = "abcdefghijklm"[:levels]
    items = [("a", "&a [x, x, x, x, x, x, x, x, x]")]
    for prev, name in zip(names, names[1:]):
        items.append((name, f"&{name} [" + ", ".join([f"*{prev}"] * 9) + "]"))
    return items


# ------------------------------------------------------------------------------- bounded YAML
@pytest.mark.timeout(60)
@pytest.mark.parametrize("via", ["file", "base", "suite", "override"])
def test_anchor_bomb_refused_quickly(tmp_path, via):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("".join(f"{k}: {v}\n" for k, v in _bomb()))
    if via == "file":
        msg = _refused(_load, "knn", path=bomb)
    elif via == "base":
        (tmp_path / "child.yaml").write_text("base: bomb.yaml\n")
        msg = _refused(_load, "knn", path=tmp_path / "child.yaml")
    elif via == "suite":
        msg = _refused(load_suite, str(bomb))
    else:   # a key=value override is YAML too (and suites hold overrides)
        flow = "{" + ", ".join(f"{k}: {v}" for k, v in _bomb()) + "}"
        msg = _refused(_load, "voc", f"detectron2={flow}")
    assert "expands to" in msg


def test_recursive_alias_and_deep_nesting_refused(tmp_path):
    (tmp_path / "loop.yaml").write_text("ks: &a [*a]\n")
    assert "alias" in _refused(_load, "knn", path=tmp_path / "loop.yaml")
    (tmp_path / "deep.yaml").write_text("detectron2: " + "[" * 2000 + "]" * 2000 + "\n")
    assert "nested" in _refused(_load, "voc", path=tmp_path / "deep.yaml")


def test_oversized_file_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("temperature: 0.1\n" + ("# padding" + "." * 90 + "\n") * 21_000)   # 2.1 MB of comments
    assert "larger than" in _refused(_load, "knn", path=big)


# ------------------------------------------------------------------------------- no echo of files
def test_base_outside_yaml_is_not_echoed(tmp_path):
    (tmp_path / "secret.txt").write_text(f"{SECRET}\nuser:password\n")
    (tmp_path / "c.yaml").write_text("base: secret.txt\n")
    msg = _refused(_load, "knn", path=tmp_path / "c.yaml")
    assert SECRET not in msg and ".yaml" in msg
    if Path("/etc/passwd").is_file():
        (tmp_path / "p.yaml").write_text("base: /etc/passwd\n")
        assert "root:" not in _refused(_load, "knn", path=tmp_path / "p.yaml")


@pytest.mark.parametrize("text", [f"{SECRET} line one\n{SECRET} line two\n",       # not a mapping
                                  f"temperature: [1, {SECRET}\n",                   # parse error
                                  f"temperature: 0.1\n\t{SECRET}: 1\n"])            # tab: scanner error
def test_yaml_errors_quote_no_file_text(tmp_path, text):
    (tmp_path / "secret.yaml").write_text(text)
    (tmp_path / "c.yaml").write_text("base: secret.yaml\n")
    msg = _refused(_load, "knn", path=tmp_path / "c.yaml")
    assert SECRET not in msg
    if "mapping" not in msg:
        assert "line " in msg and "column " in msg


def test_long_values_are_cut_in_messages():
    msg = _refused(_load, "knn", "temperature=" + "y" * 5000)
    assert "'temperature'" in msg and "y" * 201 not in msg


# ------------------------------------------------------------------------------- values
@pytest.mark.parametrize("name,override,key", [
    ("knn", "temperature=nan", "temperature"),
    ("knn", "temperature=inf", "temperature"),
    ("linear", "lr=inf", "lr"),
    ("linear", "lr=-inf", "lr"),
    ("pretrain", "loss.tau_h=nan", "loss.tau_h"),
    ("voc", "detectron2.SOLVER.BASE_LR=.inf", "detectron2.SOLVER.BASE_LR"),   # free-form dicts too
])
def test_non_finite_override_refused(name, override, key):
    msg = _refused(_load, name, override)
    assert f"'{key}'" in msg and "finite" in msg


@pytest.mark.parametrize("name,text,key", [
    ("knn", "temperature: .nan\n", "temperature"),
    ("linear", "lr: .inf\n", "lr"),
    ("pretrain", "monitor:\n  positive_thresholds: [0.001, .nan]\n", "monitor.positive_thresholds[1]"),
])
def test_non_finite_in_file_refused(tmp_path, name, text, key):
    (tmp_path / "c.yaml").write_text(text)
    msg = _refused(_load, name, path=tmp_path / "c.yaml")
    assert f"'{key}'" in msg and "finite" in msg


RANGE_CASES = [
    # classification protocols (ProtocolConfig and each protocol's own keys)
    ("knn", "batch_size=0", "batch_size"), ("knn", "resize=0", "resize"), ("knn", "crop=-1", "crop"),
    ("knn", "crop=300", "crop"), ("knn", "ks=[10,0]", "ks"), ("knn", "temperature=0", "temperature"),
    ("knn", "chunk_size=-1", "chunk_size"),
    ("linear", "epochs=0", "epochs"), ("linear", "lr=-0.1", "lr"), ("linear", "lr=0", "lr"),
    ("linear", "momentum=1.5", "momentum"), ("linear", "weight_decay=-1e-4", "weight_decay"),
    ("linear", "seed=-1", "seed"),
    ("semi", "epochs=0", "epochs"), ("semi", "backbone_lr=-0.001", "backbone_lr"), ("semi", "head_lr=0", "head_lr"),
    ("semi", "milestones=[0,30]", "milestones"), ("semi", "gamma=0", "gamma"),
    # detectron2 protocols and segmentation
    ("voc", "seeds=0", "seeds"), ("coco", "gpus=0", "gpus"), ("voc", "first_seed=-1", "first_seed"),
    ("coco", "num_machines=0", "num_machines"), ("voc", "machine_rank=1", "machine_rank"),
    ("seg", "gpus=0", "gpus"), ("seg", "seed=-1", "seed"), ("seg", "global_batch=0", "global_batch"),
    # pretraining, nested sections
    ("pretrain", "optim.epochs=0", "optim.epochs"), ("pretrain", "optim.batch_size=0", "optim.batch_size"),
    ("pretrain", "optim.base_lr=-0.05", "optim.base_lr"), ("pretrain", "optim.momentum=-0.1", "optim.momentum"),
    ("pretrain", "optim.teacher_momentum=1.01", "optim.teacher_momentum"),
    ("pretrain", "optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("pretrain", "loss.tau_s=0", "loss.tau_s"), ("pretrain", "loss.tau_t=-0.04", "loss.tau_t"),
    ("pretrain", "loss.infonce_temperature=0", "loss.infonce_temperature"),
    ("pretrain", "data.image_size=0", "data.image_size"), ("pretrain", "data.crop_scale=[0,1]", "data.crop_scale"),
    ("pretrain", "data.crop_scale=[0.2,1.5]", "data.crop_scale"),
    ("pretrain", "model.dim=0", "model.dim"), ("pretrain", "model.queue_size=0", "model.queue_size"),
    ("pretrain", "model.bn_splits=0", "model.bn_splits"),
    ("pretrain", "monitor.knn_k=0", "monitor.knn_k"), ("pretrain", "monitor.knn_crop=300", "monitor.knn_crop"),
    ("pretrain", "monitor.knn_temperature=0", "monitor.knn_temperature"),
    ("pretrain", "monitor.log_every=0", "monitor.log_every"),
    ("pretrain", "run.checkpoint_every=0", "run.checkpoint_every"), ("pretrain", "run.keep_last=-1", "run.keep_last"),
]


@pytest.mark.parametrize("name,override,key", RANGE_CASES, ids=[f"{n}-{o}" for n, o, _ in RANGE_CASES])
def test_out_of_range_refused_naming_the_key(name, override, key):
    assert f"config key '{key}'" in _refused(_load, name, override)


def test_edges_of_the_ranges_are_accepted():
    cfg = _load("knn", "crop=256", "resize=256", "ks=[1]", "chunk_size=0")
    assert cfg.crop == cfg.resize == 256
    assert _load("semi", "backbone_lr=0").backbone_lr == 0
    assert _load("voc", "num_machines=2", "machine_rank=1").machine_rank == 1
    cfg = _load("pretrain", "monitor.knn_every=0", "optim.final_lr=0", "data.crop_scale=[0.08,1]",
                "monitor.knn_resize=32", "monitor.knn_crop=32")
    assert cfg.monitor.knn_crop == 32 and list(cfg.data.crop_scale) == [0.08, 1.0]


def test_crop_larger_than_resize_refused_in_a_file(tmp_path):
    (tmp_path / "c.yaml").write_text("resize: 64\ncrop: 96\n")
    msg = _refused(_load, "linear", path=tmp_path / "c.yaml")
    assert "'crop'" in msg and "resize (64)" in msg


# ------------------------------------------------------------------------------- shipped configs
def _shipped() -> list[str]:
    files = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))
    return [f for f in files if not f.startswith(FOREIGN_DIRS)]


def _schema_name(rel: str) -> str:
    """configs/pretrain/** -> pretrain; configs/eval/knn_x.yaml -> knn; configs/transfer/voc_x.yaml -> voc."""
    folder, _, rest = rel.partition("/")
    return "pretrain" if folder == "pretrain" else Path(rest).stem.split("_")[0]


@pytest.mark.parametrize("rel", _shipped())
def test_every_shipped_config_loads(rel):
    if rel.startswith("suites/"):   # (each run's config with its overrides: tests/test_compare.py)
        load_suite(str(CONFIG_DIR / rel))
    else:
        assert rel.split("/")[0] in ("eval", "pretrain", "transfer"), f"no schema known for configs/{rel}"
        _load(_schema_name(rel), path=CONFIG_DIR / rel)
