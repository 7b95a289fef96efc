"""Learning signal (issue 3): does the short CPU pretraining of the shared fixture learn anything?

The session fixture ``pretrained_ckpt`` (``configs/pretrain/demo_synth.yaml`` on the default
synthshapes root: 600 train / 1000 val grey images, 10 shapes) must give a backbone whose
weighted-kNN top-1 on the held-out val split beats the same architecture at random initialisation
(``random_ckpt``) by ``MARGIN`` points at the images' native ``SIZE`` of 64 px. Both go through
the kNN protocol itself (``eval.knn.run``: hub loading, centre-crop features, weighted vote).

MARGIN: with 1000 val images one estimate near 40% has a binomial standard deviation of ~1.5
points and a difference of two ~2.2, so 10 points is ~4.5 sigma.

MEASURED (kNN top-1 %, best of k in {10, 20, 50}; 64 epochs of batch 32, lr 0.1, InfoNCE warm-up
32 epochs; 170-210 s of pretraining on 2 CPU threads):
  this fixture (seed 0, 2 threads): trained 45.3 at 64 px, random init 28.5: +16.8 (45.2 before
  the hypercolumn resize of 2026-11-23 changed float32 rounding, hence the trajectory); seeds 1
  and 3 of the same config: +17.1 and +14.2; the fixture's run on 1 thread (other float32
  rounding, so another trajectory) passed too.
  the same config on a grey variant of the data (generated before the final generator), 8 seeds
  on CPU: +10.8 to +21.7 for seven seeds, -5.7 for one, whose relational phase collapsed.
Not asserted: the gain at the 32 px the demo trains at, where ResNet-18's last stage is a 1x1 map.
It is smaller and unreliable (+9.3, +9.6, +7.3 for seeds 0, 1, 3; +12.2 for seed 0 since the resize
change; +1.9 for the 1-thread run;
-12.5 to +13.7 on the variant); ``benchmarks/learning_signal.py --sizes 32 64`` reports it.
Before the grey images (colour random per image) no run of any length, on CPU or GPU, beat
random init: the queue collapsed onto the colour directions. DEVELOPMENT.md "Learning signal on
synthshapes" has the history; ``benchmarks/learning_signal.py`` runs this measurement with any
config, step budget and device.
"""
from __future__ import annotations

import math

import pytest

from cgh.records import read_record
from eval import knn
from _helpers_eval import knn_cfg

MARGIN = 10.0   # percentage points of kNN top-1 over random init (see the module docstring)
SIZE = 64       # px: the images' native size


def _knn_top1(ckpt, root, out, size):
    cfg = knn_cfg(knn, ckpt, root, out, ks=[10, 20, 50], cache_dir="", resize=size, crop=size)
    return read_record(knn.run(cfg))["metrics"]["top1"]


def test_pretraining_beats_random_init(synth_root, pretrained_ckpt, random_ckpt, tmp_path):
    trained = _knn_top1(pretrained_ckpt, synth_root, tmp_path / "trained", SIZE)
    random = _knn_top1(random_ckpt, synth_root, tmp_path / "random", SIZE)
    assert trained >= random + MARGIN, {"trained": trained, "random": random}


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
