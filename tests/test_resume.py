"""A run SIGKILLed after a checkpoint and resumed with ``--resume auto`` ends bitwise identical to an
uninterrupted run (CPU, same thread count): weights, teacher, queues, optimizer, logged history."""
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

from _helpers_trainer import tiny_overrides, tiny_synth

EPOCHS = 4
VOLATILE = {"wall_time_s", "img_per_s"}   # timings legitimately differ between runs


def _cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cgh.cli", "pretrain", "--config", "pretrain/demo_synth",
            *tiny_overrides(root, out), f"optim.epochs={EPOCHS}", "monitor.knn_every=2",
            "run.deterministic=true", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(f)]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    root = tiny_synth(tmp_path / "synth")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(root, full), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(_cmd(root, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "epoch_0002.pt"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never wrote its epoch-2 checkpoint"
    assert not (killed / "backbone.safetensors").exists(), "the run finished before it was killed"

    res = subprocess.run(_cmd(root, killed, "--resume", "auto"), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and f"/{EPOCHS})" in res.stdout
    resumed_epoch = int(res.stdout.split("(epoch ")[1].split("/")[0])
    assert 2 <= resumed_epoch < EPOCHS

    a, b = load_file(str(full / "backbone.safetensors")), load_file(str(killed / "backbone.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the whole final training state: student, teacher, queues and pointer, optimizer momentum
    sa = torch.load(full / "checkpoints" / f"epoch_{EPOCHS:04d}.pt", weights_only=True)
    sb = torch.load(killed / "checkpoints" / f"epoch_{EPOCHS:04d}.pt", weights_only=True)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert "queue.global_keys" in sa["model"] and int(sa["model"]["queue.ptr"]) == (EPOCHS * 4 * 16) % 32
    for i, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], sb["optimizer"]["state"][i]["momentum_buffer"])
    # every logged number (losses, lr, kNN monitor, positive selection) is identical too
    assert _rows(full) == _rows(killed) and len(_rows(full)) == EPOCHS
