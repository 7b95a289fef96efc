"""The classification protocols follow their official sources (tests/official/classification.yaml):
the shipped configs resolve to the table's values; kNN resizes with PIL's bicubic filter; the
linear probe's cosine is stepped per iteration; records carry the best and the last epoch; the
semi-supervised head starts from torchvision's init with the script's normalisation, keeps the
last partial batch and uses SyncBN across GPUs; backbone precision is validated and recorded."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from cgh.backbone import build_backbone
from cgh.config import ConfigError
from cgh.errors import CghError
from cgh.protocols import load_protocol_config
from cgh.records import read_record
from eval import features, knn, linear, semi
from eval.training import best_and_last
from _helpers_eval import knn_cfg, synth_cls_root  # noqa: F401  (fixture)

OFFICIAL = yaml.safe_load((Path(__file__).parent / "official" / "classification.yaml").read_text())
REQUIRED = ["checkpoint=x", "output_dir=y", "data_root=z"]
AUTHORS_COMMIT = "d064b0009636e684f46f94780a94d50dd8259578"


def _plain(value):
    return list(value) if not isinstance(value, (str, int, float, bool)) else value


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_shipped_config_equals_official_table(name):
    """Each shipped config, resolved as ``cgh eval`` resolves it, holds the official values, and
    the transforms the protocol builds from it resize, crop, augment and normalise as the source."""
    entry = OFFICIAL[name]
    assert AUTHORS_COMMIT in entry["source"], entry["source"]
    cfg = load_protocol_config(entry["protocol"], entry["config"], REQUIRED)
    for key, want in entry["values"].items():
        assert _plain(getattr(cfg, key)) == want, f"{entry['config']}: {key} ({entry['source']})"
    train_tf, val_tf, _ = features.protocol_transforms(cfg)
    if "val_transform" in entry:
        want = entry["val_transform"]
        resize, crop, _, norm = val_tf.transforms
        assert resize.interpolation == features.INTERPOLATIONS[want["interpolation"]]
        assert (resize.size, crop.size) == (cfg.resize, (cfg.crop, cfg.crop))
        assert (list(norm.mean), list(norm.std)) == (want["mean"], want["std"])
    if "train_transform" in entry:
        want = entry["train_transform"]
        crop, flip, _, norm = train_tf.transforms
        assert isinstance(crop, T.RandomResizedCrop) and crop.size == (want["crop"], want["crop"])
        assert list(crop.scale) == want["scale"] and flip.p == want["flip"] and list(norm.std) == want["std"]


def test_knn_resize_is_pil_bicubic_bit_exact(synth_cls_root):
    """The kNN config's eval transform equals PIL's own bicubic resize of a real image, bit for
    bit, and differs from the bilinear one (so the comparison can fail)."""
    path = sorted((synth_cls_root / "classification" / "val").rglob("*.png"))[0]
    image = Image.open(path).convert("RGB")
    cfg = load_protocol_config("knn", "eval/knn_imagenet", REQUIRED + ["resize=48", "crop=48"])
    _, tf, desc = features.protocol_transforms(cfg)
    norm = T.Normalize(features.IMAGENET_MEAN, features.IMAGENET_STD)

    def by_pil(resample):
        return norm(TF.to_tensor(image.resize((48, 48), resample)))
    got = tf(image)
    assert torch.equal(got, by_pil(Image.BICUBIC))
    assert not torch.equal(got, by_pil(Image.BILINEAR))
    assert desc == "resize48-bicubic-centercrop48-imagenet-norm"


def test_knn_run_extracts_from_bicubic_images_in_fp32(synth_cls_root, random_ckpt, tmp_path):
    """End to end: the features a kNN run caches are the backbone's on PIL-bicubic-resized images;
    the record names the transform and the precision."""
    cache = tmp_path / "cache"
    rec = read_record(knn.run(knn_cfg(knn, random_ckpt, synth_cls_root, tmp_path / "k", resize=32, crop=32,
                                      ks=[5], cache_dir=cache)))
    assert rec["extra"]["transform"] == "resize32-bicubic-centercrop32-imagenet-norm"
    assert rec["extra"]["precision"] == "fp32" and rec["extra"]["search_precision"] == "fp32"
    assert rec["config"]["interpolation"] == "bicubic" and rec["config"]["backbone_precision"] == "fp32"
    val = features.build_split("synthshapes", synth_cls_root, "val", None)
    (cached,) = [load_file(str(p))["features"] for p in cache.glob("features-val-*.safetensors")]
    model, _ = features.load_model(random_ckpt)
    norm = T.Normalize(features.IMAGENET_MEAN, features.IMAGENET_STD)

    def embed(resample):
        batch = torch.stack([norm(TF.to_tensor(Image.open(val.samples[i][0]).convert("RGB").resize((32, 32), resample)))
                             for i in range(3)])
        with torch.no_grad():
            return model(batch)
    torch.testing.assert_close(cached[:3], embed(Image.BICUBIC), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cached[:3], embed(Image.BILINEAR), rtol=1e-3, atol=1e-4)


def test_best_and_last_by_hand():
    history = [{"epoch": 1, "loss": 2.0, "top1": 40.0, "top5": 70.0},
               {"epoch": 2, "loss": 1.0, "top1": 55.0, "top5": 80.0},
               {"epoch": 3, "loss": 0.9, "top1": 55.0, "top5": 90.0},     # a tie: the earlier epoch stays best
               {"epoch": 4, "loss": 0.8, "top1": 50.0, "top5": 85.0}]
    assert best_and_last(history) == {"top1": 50.0, "top5": 85.0, "top1_last": 50.0, "top5_last": 85.0,
                                      "top1_best": 55.0, "top5_best": 80.0, "best_epoch": 2}
    with pytest.raises(CghError, match="not validated"):
        best_and_last(history + [{"epoch": 5, "loss": 0.7}])


def test_fast_probe_record_keeps_best_and_last():
    """A case where validation accuracy peaks and falls: x1 = 0.5 y separates the train set exactly
    but points the other way in val, x0 = y + noise is learned first (larger gradient). Val top-1
    starts at 100 and ends at 0 as the head's weight on the shortcut grows; best and last differ."""
    g = torch.Generator().manual_seed(0)
    ytr, yva = torch.arange(200) % 2, torch.arange(100) % 2
    s, sv = (2 * ytr - 1).float(), (2 * yva - 1).float()
    xtr = torch.stack([s + 2.0 * torch.randn(200, generator=g), 0.5 * s], 1)
    xva = torch.stack([sv, -0.5 * sv], 1)
    cfg = linear.Config(checkpoint="-", output_dir="-", data_root="-", epochs=20, lr=0.5, momentum=0.0,
                        batch_size=200)
    metrics, history = linear.fit_on_features(xtr, ytr, xva, yva, 2, cfg, torch.device("cpu"))
    top1 = [row["top1"] for row in history]
    assert top1[0] == 100.0 and top1[-1] == 0.0
    assert metrics["top1_best"] == max(top1) == 100.0 and metrics["best_epoch"] == 1
    assert metrics["top1"] == metrics["top1_last"] == 0.0
    assert metrics["top5_best"] == history[0]["top5"] and metrics["top5"] == history[-1]["top5"]


@pytest.mark.parametrize("step,expected", [
    # 10 features, batch 4: 3 iterations an epoch (the last one partial), 2 epochs; the history's lr
    # is the one of each epoch's last iteration.
    ("iteration", [0.5 * (1 + math.cos(math.pi * 2 / 6)), 0.5 * (1 + math.cos(math.pi * 5 / 6))]),
    ("epoch", [1.0, 0.5 * (1 + math.cos(math.pi * 1 / 2))]),
])
def test_cosine_per_iteration_or_per_epoch_by_hand(step, expected):
    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 2
    cfg = linear.Config(checkpoint="-", output_dir="-", data_root="-", epochs=2, lr=0.3, batch_size=4,
                        lr_schedule_step=step)
    _, history = linear.fit_on_features(x, y, x, y, 2, cfg, torch.device("cpu"))
    assert [row["lr"] for row in history] == pytest.approx([0.3 * f for f in expected], rel=1e-12)
    factor = linear.lr_factor(cfg)
    if step == "iteration":
        assert [factor(t, 3) for t in range(6)] == pytest.approx(
            [0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)], rel=1e-12)


def test_head_init_torchvision_equals_nn_linear():
    torch.manual_seed(3)
    ours = linear.new_head(512, 10, "torchvision")
    torch.manual_seed(3)
    ref = nn.Linear(512, 10)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    torch.manual_seed(3)
    moco = linear.new_head(512, 10, "normal")
    assert not torch.equal(moco.weight, ref.weight) and torch.count_nonzero(moco.bias) == 0
    assert moco.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_semi_run_follows_the_authors_script(synth_cls_root, random_ckpt, tmp_path, monkeypatch):
    """A semi run with the defaults: torchvision head init, std [0.228, 0.224, 0.225] in both
    transforms, per-process BN on one CPU process, fp32, and a record with best and last."""
    seen = {}
    real_fit = semi.fit

    def spy(model, train_ds, **kw):     # looks at what fit receives, then trains for real
        head = model[1]
        seen.update(bias_nonzero=bool(torch.count_nonzero(head.bias)), max_w=head.weight.abs().max().item(),
                    std_w=head.weight.std().item(),
                    train_std=train_ds.dataset.transform.transforms[-1].std,
                    val_std=kw["val_ds"].transform.transforms[-1].std, drop_last=kw["drop_last"])
        return real_fit(model, train_ds, **kw)
    monkeypatch.setattr(semi, "fit", spy)
    rec = read_record(semi.run(knn_cfg(semi, random_ckpt, synth_cls_root, tmp_path / "s", subset="10percent",
                                       epochs=2, batch_size=30, resize=16, crop=16, milestones="[30,40]")))
    # nn.Linear's init: U(-1/sqrt(512), 1/sqrt(512)) for weight and bias (std 0.0255), not N(0, 0.01) and 0
    assert seen["bias_nonzero"] and seen["max_w"] <= 1 / math.sqrt(512) and 0.02 < seen["std_w"] < 0.03
    assert seen["train_std"] == seen["val_std"] == (0.228, 0.224, 0.225) and seen["drop_last"] is False
    m, history = rec["metrics"], rec["extra"]["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert m["top1"] == m["top1_last"] == history[-1]["top1"] and m["top5_last"] == history[-1]["top5"]
    best = max(history, key=lambda r: (r["top1"], -r["epoch"]))
    assert (m["top1_best"], m["top5_best"], m["best_epoch"]) == (best["top1"], best["top5"], best["epoch"])
    assert rec["extra"]["batchnorm"] == "per-process" and rec["extra"]["precision"] == "fp32"
    assert rec["extra"]["reported_epoch"] == "best" and rec["config"]["head_init"] == "torchvision"


def test_semi_keeps_the_last_partial_batch(synth_cls_root, random_ckpt, tmp_path):
    """30 labelled images, batch 29: kept, the last batch holds one image, which BatchNorm cannot
    train on (a clear error); dropped (drop_last=true), the run trains."""
    kw = dict(subset="10percent", epochs=1, batch_size=29, resize=16, crop=16, milestones="[30,40]")
    with pytest.raises(CghError, match="last batch would hold 1 image"):
        semi.run(knn_cfg(semi, random_ckpt, synth_cls_root, tmp_path / "keep", **kw))
    rec = read_record(semi.run(knn_cfg(semi, random_ckpt, synth_cls_root, tmp_path / "drop", drop_last="true", **kw)))
    assert len(rec["extra"]["history"]) == 1


def test_sync_batchnorm_across_gpus_only():
    model = nn.Sequential(build_backbone("resnet18"), nn.Linear(512, 3))
    keys = list(model.state_dict())
    same, mode = semi.sync_batchnorm(model, torch.device("cpu"), 1)
    assert same is model and mode == "per-process"
    logged = []
    same, mode = semi.sync_batchnorm(model, torch.device("cpu"), 2, logged.append)
    assert same is model and mode == "per-process" and "per-process" in logged[0]
    params = [id(p) for p in model.parameters()]
    synced, mode = semi.sync_batchnorm(model, torch.device("cuda", 0), 2)   # conversion only; runs on CUDA
    assert mode == "sync" and list(synced.state_dict()) == keys and [id(p) for p in synced.parameters()] == params
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)


@pytest.mark.parametrize("protocol,key,value,allowed", [
    ("knn", "backbone_precision", "fp16", "fp32, bf16"),
    ("knn", "interpolation", "nearest", "bilinear, bicubic"),
    ("linear", "backbone_precision", "half", "fp32, bf16"),
    ("linear", "lr_schedule_step", "step", "iteration, epoch"),
    ("linear", "reported_epoch", "mean", "best, last"),
    ("semi", "head_init", "xavier", "normal, torchvision"),
    ("semi", "interpolation", "area", "bilinear, bicubic"),
])
def test_enumerated_settings_are_checked(protocol, key, value, allowed, tmp_path):
    module = {"knn": knn, "linear": linear, "semi": semi}[protocol]
    cfg = knn_cfg(module, tmp_path / "never_read.safetensors", tmp_path, tmp_path / "o", **{key: value})
    with pytest.raises(ConfigError, match=f"config key '{key}' must be one of {allowed}; got '{value}'"):
        module.run(cfg)


def test_precision_is_recorded_as_computed(synth_cls_root, random_ckpt, tmp_path):
    """bf16 asked for on a CPU: the config block says bf16, the record says what ran (fp32)."""
    cfg = knn_cfg(linear, random_ckpt, synth_cls_root, tmp_path / "p", fast="true", epochs=2, lr=3.0,
                  resize=16, crop=16, cache_dir="", backbone_precision="bf16")
    rec = read_record(linear.run(cfg))
    assert rec["config"]["backbone_precision"] == "bf16" and rec["extra"]["precision"] == "fp32"
    assert rec["extra"]["reported_epoch"] == "best"
    assert {"top1_best", "top5_best", "best_epoch", "top1_last", "top5_last"} <= set(rec["metrics"])
