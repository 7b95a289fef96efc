"""Shared bits of the pretraining tests: a tiny synthshapes root, a tiny fast config, and the
SIGKILL-then-resume check."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cgh.data.synth import generate


def tiny_synth(root: Path) -> Path:
    """4 classes x 16 train / 4 val images of 32 px (plus the smallest detection part)."""
    generate(root, seed=0, num_classes=4, train_per_class=16, val_per_class=4, image_size=32,
             det_classes=1, det_train=1, det_test=1, det_image_size=64)
    return root


def tiny_overrides(root: Path, out: Path) -> list[str]:
    """ResNet-18 on 16 px views, batch 16, queue 32: an epoch of 4 steps takes about a second."""
    return [f"data.root={root}", f"output_dir={out}", "data.dataset=synthshapes", "data.image_size=16",
            "data.num_workers=0", "model.arch=resnet18", "model.dim=16", "model.hidden_dim=32",
            "model.queue_size=32", "model.bn_splits=2", "optim.batch_size=16", "optim.epochs=2",
            "optim.warmup_epochs=1", "loss.warmup_epochs=1", "optim.base_lr=0.1",
            "optim.teacher_momentum=0.99", "monitor.knn_every=1", "monitor.knn_resize=16",
            "monitor.knn_crop=16", "monitor.knn_k=5", "monitor.log_every=2",
            "monitor.positive_thresholds=[0.05]", "run.device=cpu", "run.checkpoint_every=1",
            "run.progress=false"]


RESUME_EPOCHS = 4
VOLATILE = {"wall_time_s", "img_per_s", "data_wait"}   # timings legitimately differ between runs


def _resume_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cgh.cli", "pretrain", "--config", "pretrain/demo_synth",
            *tiny_overrides(root, out), f"optim.epochs={RESUME_EPOCHS}", "monitor.knn_every=2",
            "run.deterministic=true", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def metric_rows(out: Path) -> list[dict]:
    """``metrics.csv`` of a run, without the timing columns."""
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(f)]


def check_sigkill_resume_is_bitwise_identical(tmp_path: Path, *extra: str) -> list[dict]:
    """Run the tiny config for ``RESUME_EPOCHS`` epochs (``extra`` overrides), and again SIGKILLed
    after its epoch-2 checkpoint then resumed with ``--resume auto``; assert both end bitwise
    identical (weights, teacher, queues, optimizer, logged history). Returns the logged rows."""
    root = tiny_synth(tmp_path / "synth")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_resume_cmd(root, full, *extra), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(_resume_cmd(root, killed, *extra), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "epoch_0002.pt"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never wrote its epoch-2 checkpoint"
    assert not (killed / "backbone.safetensors").exists(), "the run finished before it was killed"

    res = subprocess.run(_resume_cmd(root, killed, *extra, "--resume", "auto"), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and f"/{RESUME_EPOCHS})" in res.stdout
    resumed_epoch = int(res.stdout.split("(epoch ")[1].split("/")[0])
    assert 2 <= resumed_epoch < RESUME_EPOCHS

    a, b = load_file(str(full / "backbone.safetensors")), load_file(str(killed / "backbone.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the whole final training state: student, teacher, queues and pointer, optimizer momentum
    sa = torch.load(full / "checkpoints" / f"epoch_{RESUME_EPOCHS:04d}.pt", weights_only=True)
    sb = torch.load(killed / "checkpoints" / f"epoch_{RESUME_EPOCHS:04d}.pt", weights_only=True)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert "queue.global_keys" in sa["model"] and int(sa["model"]["queue.ptr"]) == (RESUME_EPOCHS * 4 * 16) % 32
    for i, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], sb["optimizer"]["state"][i]["momentum_buffer"])
    # every logged number (losses, lr, kNN monitor, positive selection) is identical too
    rows = metric_rows(full)
    assert rows == metric_rows(killed) and len(rows) == RESUME_EPOCHS
    return rows
