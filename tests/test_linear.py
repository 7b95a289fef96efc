"""Linear probe: the head learns, the backbone stays frozen, runs resume exactly, the fast mode is
labelled as its own protocol, a pretrained backbone beats random init, bad input fails clearly."""
from __future__ import annotations

import math

import pytest
import torch

from cgh.backbone import build_backbone
from cgh.errors import CghError
from cgh.records import read_record
from eval import linear
from eval.training import cosine_factor
from _helpers_eval import eval_under_torchrun, knn_cfg, synth_cls_root  # noqa: F401  (fixture)


def test_cosine_schedule_by_hand():
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(99, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))


def test_fast_probe_learns_separable_features():
    """On linearly separable features the head must reach 100% (and chance is 20%)."""
    g = torch.Generator().manual_seed(0)
    centres = 5 * torch.eye(5, 16)
    ytr, yva = torch.arange(200) % 5, torch.arange(50) % 5
    xtr = centres[ytr] + 0.3 * torch.randn(200, 16, generator=g)
    xva = centres[yva] + 0.3 * torch.randn(50, 16, generator=g)
    cfg = linear.Config(checkpoint="-", output_dir="-", data_root="-", epochs=20, lr=0.5, batch_size=32)
    metrics, history = linear.fit_on_features(xtr, ytr, xva, yva, 5, cfg, torch.device("cpu"))
    assert metrics["top1"] == 100.0
    assert len(history) == 20 and history[-1]["loss"] < history[0]["loss"] / 5


def test_probe_keeps_backbone_frozen():
    torch.manual_seed(0)
    probe = linear.LinearProbe(build_backbone("resnet18"), 512, 3)
    before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    opt = torch.optim.SGD(probe.head.parameters(), lr=1.0)
    probe.train()
    assert not probe.backbone.training and probe.head.training
    loss = torch.nn.functional.cross_entropy(probe(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in probe.backbone.parameters())
    after = probe.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # incl. BN running statistics


def test_full_probe_resumes_exactly(synth_cls_root, random_ckpt, tmp_path, monkeypatch):
    kw = dict(epochs=2, lr=3.0, batch_size=50, resize=32, crop=32)   # 32 px: a quarter of the compute
    whole = read_record(linear.run(knn_cfg(linear, random_ckpt, synth_cls_root, tmp_path / "whole", **kw)))
    assert whole["protocol"] == "linear" and len(whole["extra"]["history"]) == 2
    assert 0 <= whole["metrics"]["top1"] <= whole["metrics"]["top5"] <= 100
    # 300 images, batch 50: 6 iterations an epoch; the cosine steps per iteration (the history
    # holds each epoch's last lr), and every epoch is validated: the record has last and best.
    hist, m = whole["extra"]["history"], whole["metrics"]
    assert [h["lr"] for h in hist] == pytest.approx([3.0 * 0.5 * (1 + math.cos(math.pi * t / 12)) for t in (5, 11)])
    assert m["top1"] == m["top1_last"] == hist[-1]["top1"] and m["top5_last"] == hist[-1]["top5"]
    assert m["top1_best"] == max(h["top1"] for h in hist) and hist[int(m["best_epoch"]) - 1]["top5"] == m["top5_best"]

    # Interrupt at the start of epoch 2 (after epoch 1's state was saved), then run again. The
    # cosine is stepped per iteration: its first step of epoch 2 of 2 is t = total / 2.
    real = linear.cosine_factor

    def crash(t, total):
        if 2 * t == total:
            raise KeyboardInterrupt
        return real(t, total)
    monkeypatch.setattr(linear, "cosine_factor", crash)
    cfg = knn_cfg(linear, random_ckpt, synth_cls_root, tmp_path / "resumed", **kw)
    with pytest.raises(KeyboardInterrupt):
        linear.run(cfg)
    assert torch.load(tmp_path / "resumed" / linear.STATE_NAME, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(linear, "cosine_factor", real)
    resumed = read_record(linear.run(cfg))
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["extra"]["history"] == whole["extra"]["history"]
    a = torch.load(tmp_path / "whole" / linear.STATE_NAME, weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / linear.STATE_NAME, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The saved state belongs to this checkpoint and setup: another one is refused, not mixed in.
    with pytest.raises(CghError, match="different run.*epochs"):
        linear.run(knn_cfg(linear, random_ckpt, synth_cls_root, tmp_path / "whole", **{**kw, "epochs": 3}))


def test_full_probe_under_torchrun_matches_a_by_hand_score(synth_root, pretrained_ckpt, tmp_path):
    """The multi-process path on CPU (gloo): ``cgh eval linear`` under ``torchrun --nproc_per_node 2``
    trains with DDP and scores each process's half of val; the record's top-1/top-5 (counts summed
    over the processes) equal the saved head scored here image by image, and one record is written.
    (The pretrained backbone, so that predictions vary: a head that always says one class would
    score the same on either half of the class-balanced val set.)"""
    from eval.features import build_split, eval_transform, open_checkpoint

    out = tmp_path / "ddp"
    res = eval_under_torchrun("linear", pretrained_ckpt, synth_root, out, "epochs=2", "lr=3.0", "batch_size=50",
                              "resize=64", "crop=64")
    assert res.stdout.count("record:") == 1            # rank 0 reports, rank 1 stays quiet
    rec = read_record(out / "result.json")
    assert rec["protocol"] == "linear" and [h["epoch"] for h in rec["extra"]["history"]] == [1, 2]

    backbone, _ = open_checkpoint(knn_cfg(linear, pretrained_ckpt, synth_root, tmp_path / "unused"))
    probe = linear.LinearProbe(backbone, 512, 10)
    probe.head.load_state_dict(torch.load(out / linear.STATE_NAME, weights_only=True)["model"])
    probe.eval()
    val = build_split("synthshapes", synth_root, "val", eval_transform(64, 64)[0])
    hit1, hit5 = [], []
    with torch.no_grad():
        for i in range(len(val)):
            image, label = val[i]
            ranked = probe(image[None])[0].argsort(descending=True).tolist()
            hit1.append(ranked[0] == label)
            hit5.append(label in ranked[:5])
    assert rec["metrics"]["top1"] == 100.0 * sum(hit1) / len(val)
    assert rec["metrics"]["top5"] == 100.0 * sum(hit5) / len(val)
    # rank 0's half alone (every other image) scores differently, so the sum over processes counted
    assert 100.0 * sum(hit1[0::2]) / len(hit1[0::2]) != rec["metrics"]["top1"]


def test_fast_mode_is_its_own_protocol(synth_cls_root, random_ckpt, tmp_path):
    cfg = knn_cfg(linear, random_ckpt, synth_cls_root, tmp_path / "f", fast="true", epochs=5, lr=3.0,
                  resize=32, crop=32, cache_dir=str(tmp_path / "cache"))
    rec = read_record(linear.run(cfg))
    assert rec["protocol"] == "linear_fast"
    assert rec["extra"]["feature_cache"] == {"train": "miss", "val": "miss"}
    assert not (tmp_path / "f" / linear.STATE_NAME).exists()


def test_pretrained_beats_random(synth_root, pretrained_ckpt, random_ckpt, tmp_path):
    """Fast linear probe (centre-crop features, 30 epochs) on the shared synthshapes fixtures, at the
    images' native 64 px (tests/test_learning_signal.py: the gain at 32 px is unreliable)."""
    top1 = {}
    for name, ckpt in (("pretrained", pretrained_ckpt), ("random", random_ckpt)):
        cfg = knn_cfg(linear, ckpt, synth_root, tmp_path / name, fast="true", epochs=30, lr=3.0, cache_dir="",
                      resize=64, crop=64)
        top1[name] = read_record(linear.run(cfg))["metrics"]["top1"]
    assert top1["pretrained"] > top1["random"] + 5, top1


def test_divergence_rule_by_hand():
    from eval.training import divergence

    def losses(*values):
        return [{"epoch": i + 1, "loss": v} for i, v in enumerate(values)]

    assert divergence(losses(2.5, 1.2)) is None
    assert divergence(losses(425.0, 1694.0, 1090.0, 50.0)) is None        # high, but it learns
    assert "grew from 100 (epoch 1) to 1e+07 (epoch 2)" in divergence(losses(100.0, 1e7, 3e7))
    assert "ended at 30" in divergence(losses(2.8, 6.4, 30.0))           # last epoch 10x the first
    assert divergence(losses(2.8, 6.4, 27.9)) is None
    assert "became nan in epoch 2" in divergence(losses(2.5, float("nan")))


def test_diverged_probe_is_flagged_in_its_record(synth_cls_root, random_ckpt, tmp_path):
    """A learning rate so high that the head's weights overflow: the loss turns non-finite and the
    record says the probe diverged; a sane one is not flagged."""
    flags = {}
    for lr in (0.1, 1e38):
        cfg = knn_cfg(linear, random_ckpt, synth_cls_root, tmp_path / f"lr{lr:g}", fast="true", epochs=3, lr=lr,
                      resize=32, crop=32, cache_dir=str(tmp_path / "cache"))
        flags[lr] = read_record(linear.run(cfg))["extra"].get("diverged")
    assert flags[0.1] is None and "training diverged" in flags[1e38]
