"""Learning signal (issue 3): does the short CPU pretraining of the shared fixture learn anything?

The session fixture ``pretrained_ckpt`` (``configs/pretrain/demo_synth.yaml`` on the default
synthshapes root) should give a backbone whose weighted-kNN top-1 on the held-out val split beats
the same architecture at random initialisation (``random_ckpt``) by ``MARGIN``. Both go through
the kNN protocol itself (``eval.knn.run``: hub loading, centre-crop features, weighted vote) at the
32 px the demo trains at and at the images' native 64 px.

MARGIN: val has 200 images, so one estimate's binomial standard deviation near 13% is ~2.4 points
and a difference of two is ~3.4; 10 points is a clear (about 3-sigma) gain.

MEASURED (2 busy CPU cores, kNN top-1 %, best of k in {10, 20, 50}, random init 13-14.5):
  old demo config (32 px, batch 64, queue 1024 > the 600 images; 36 s of CPU): the relational loss
  collapses to ln(queue) within 3 epochs; trained 9.5-10.0 on the old busy backgrounds (random
  13-16), 15.5 at 32 px / 11.5 at 64 px on the calm ones (random 13.0 / 14.0): noise, not signal.
  current demo config (queue 256, batch 32, teacher momentum 0.99, lr 0.03, InfoNCE warm-up 10 of
  16 epochs; 74 s of CPU on one thread): no collapse (final loss 5.14 < ln 256 = 5.55), trained
  13.5 at 32 px and 11.0 at 64 px vs random 13.0 and 14.0; online monitor 12.5 (epoch 8), 9.5 (16).
  The same settings with a 20-epoch InfoNCE warm-up and 30 epochs (900
  steps, 142 s of CPU): no collapse (loss 5.1-5.2 < ln 256), trained 11.5-12.5; the same run with
  InfoNCE only: 14.0. A supervised ResNet-18 (same 32 px, 240 steps) reached only 15.0 (random 12.5).
So no run within the fixture's CPU budget reached the margin; the gain test is an expected
failure until one does (it reports the numbers either way). README "Learning signal on
synthshapes" has the later diagnosis (an independent MoCo loop behaves the same; colour is learned
first; conv1 thrash; supervised training is as slow), and ``benchmarks/learning_signal.py`` runs
this measurement with any step budget and device.
"""
from __future__ import annotations

import math

import pytest

from cgh.records import read_record
from eval import knn
from _helpers_eval import knn_cfg

MARGIN = 10.0        # percentage points of kNN top-1 over random init (see the module docstring)


def _knn_top1(ckpt, root, out, size):
    cfg = knn_cfg(knn, ckpt, root, out, ks=[10, 20, 50], cache_dir="", resize=size, crop=size)
    return read_record(knn.run(cfg))["metrics"]["top1"]


@pytest.mark.xfail(reason="no short CPU pretraining measured so far beats random init on synthshapes "
                          "by MARGIN (see the module docstring)", strict=False)
@pytest.mark.parametrize("size", [32, 64])
def test_pretraining_beats_random_init(synth_root, pretrained_ckpt, random_ckpt, tmp_path, size):
    trained = _knn_top1(pretrained_ckpt, synth_root, tmp_path / "trained", size)
    random = _knn_top1(random_ckpt, synth_root, tmp_path / "random", size)
    assert trained >= random + MARGIN, {"trained": trained, "random": random, "size": size}


def test_pretrain_record_shows_the_online_monitor(pretrained_ckpt):
    """The pretrain record carries the per-epoch history with the online kNN monitor, run at the
    last epoch, and its headline ``knn_top1`` is that last value; the loss stayed finite."""
    rec = read_record(pretrained_ckpt.parent / "result.json")
    assert rec["protocol"] == "pretrain"
    history = rec["extra"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    knn_rows = [h for h in history if h.get("knn_top1") is not None]
    assert knn_rows, "no epoch ran the online kNN monitor"
    assert knn_rows[-1]["epoch"] == history[-1]["epoch"]
    assert rec["metrics"]["knn_top1"] == knn_rows[-1]["knn_top1"]
    assert all(0.0 <= h["knn_top1"] <= 100.0 for h in knn_rows)
    assert all(math.isfinite(h["loss"]) for h in history)
