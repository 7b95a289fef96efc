"""Helpers of the classification-protocol tests: a small synthshapes root, configs, a DDP worker.

The checkpoints come from ``tests/conftest.py`` (``random_ckpt``, ``pretrained_ckpt``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgh.backbone import build_backbone
from cgh.config import load_config


@pytest.fixture(scope="session")
def synth_cls_root(tmp_path_factory):
    """A small synthshapes root (10 classes x 30 train / 10 val, 64 px): fast on CPU."""
    from cgh.data.synth import generate

    root = tmp_path_factory.mktemp("synth_eval")
    generate(root, seed=0, num_classes=10, train_per_class=30, val_per_class=10, image_size=64,
             det_train=1, det_test=1, det_image_size=64)
    return root


def knn_cfg(module, ckpt, root, out, **kw):
    """A protocol config for synthshapes at its native 64 px (centre crop = whole image)."""
    base = {"checkpoint": str(ckpt), "output_dir": str(out), "dataset": "synthshapes", "data_root": str(root),
            "resize": 64, "crop": 64, "batch_size": 64, "num_workers": 0, "device": "cpu"}
    base.update(kw)
    return load_config(module.Config, None, [f"{k}={v}" for k, v in base.items()])


def eval_under_torchrun(protocol: str, ckpt, root, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``cgh eval PROTOCOL`` on synthshapes under ``torchrun --standalone --nproc_per_node 2`` (gloo,
    one thread per process); asserts that it succeeded and returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cgh.cli",
           "eval", protocol, "--checkpoint", str(ckpt), "--dataset", "synthshapes", "--data-root", str(root),
           "-o", str(out), "num_workers=0", "device=cpu", *overrides]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def ddp_extract_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One gloo process of the sharded feature extraction test: saves what it gathered."""
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from eval.features import extract_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = build_backbone("resnet18")
        x = torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        f, y = extract_features(model, TensorDataset(x, torch.arange(11)), batch_size=2, num_workers=0)
        torch.save({"features": f, "labels": y}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
