"""Fixtures of the transfer tests (the synthetic data and ResNet-18 checkpoints come from conftest)."""
from __future__ import annotations

import pytest
import torch

from cgh.backbone import backbone_state_dict, build_backbone
from cgh.canonical import save_canonical


@pytest.fixture(scope="session")
def r50_random(tmp_path_factory):
    """A randomly initialised ResNet-50 canonical checkpoint (R50-C4 / FPN wiring, depth errors)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt_r50") / "random_r50.safetensors"
    save_canonical(backbone_state_dict(build_backbone("resnet50")), path, method="random-init")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """End-to-end detectron2/mmseg runs use one torch thread: their steps are many small ops, and
    with two OpenMP threads on a busy 2-core machine the threads spin-wait (measured: 7.5 s vs
    0.6 s per VOC training step); on an idle machine one thread costs little."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def moco_detectron2_name(key: str) -> str:
    """MoCo's detection/convert-pretrain-to-detectron2.py renaming, written out independently of
    transfer.convert (the reference the hub's detectron2 reader and writer are checked against)."""
    if "layer" not in key:
        key = "stem." + key
    for t in [1, 2, 3, 4]:
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def assert_sources_pinned(table: dict, official) -> None:
    """An official-values table (tests/official/*.yaml): every source names a repository file at a
    full commit, and every entry of every protocol (``official(name)``) cites one of them."""
    import re

    sources = table["sources"]
    for source in sources.values():
        assert set(source) == {"repo", "path", "commit"} and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    for name in table["protocols"]:
        for key, entry in official(name).items():
            assert entry["source"] in sources, (name, key)
