"""Shared fixtures: the synthetic benchmark and a briefly pretrained backbone, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep the 2-core CI machine responsive and runs reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("CGH_NUM_WORKERS", "0")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The default synthshapes benchmark (classification, VOC, COCO, masks), generated once."""
    from cgh.data.synth import generate

    root = tmp_path_factory.mktemp("synthshapes")
    generate(root, seed=0)
    return root


@pytest.fixture(scope="session")
def pretrained_ckpt(synth_root, tmp_path_factory) -> Path:
    """A ResNet-18 briefly CGH-pretrained on synthshapes with the demo config (canonical file).

    Always on 2 threads: the float32 reductions, hence the (chaotic) training trajectory, depend
    on the thread count, and tests/test_learning_signal.py states what this very run measures.
    """
    from cgh.config import load_config
    from cgh.train import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrain_cgh")
    cfg = load_config(PretrainConfig, "pretrain/demo_synth.yaml",
                      [f"data.root={synth_root}", f"output_dir={out}", "run.progress=false",
                       "run.tensorboard=false"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return pretrain(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised ResNet-18 as a canonical checkpoint (the baseline every gain is against)."""
    from cgh.backbone import backbone_state_dict, build_backbone
    from cgh.canonical import save_canonical

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("random_ckpt")
    return save_canonical(backbone_state_dict(build_backbone("resnet18")), out / "random.safetensors",
                          method="random-init")
