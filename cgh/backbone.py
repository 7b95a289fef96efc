"""torchvision ResNet backbones: build one, name its depth from its weights, take its tensors.

The whole toolkit speaks torchvision key names (``conv1.weight``, ``layer3.5.bn2.running_mean``, ...)
without the classifier ``fc.*``; every other layout is converted to and from this one.
"""
from __future__ import annotations

import re

import torch
import torchvision
from torch import nn

from cgh.errors import CghError

# arch -> (blocks per stage, bottleneck?, width of layer1's 3x3 conv)
ARCHS: dict[str, tuple[tuple[int, int, int, int], bool, int]] = {
    "resnet18": ((2, 2, 2, 2), False, 64),
    "resnet34": ((3, 4, 6, 3), False, 64),
    "resnet50": ((3, 4, 6, 3), True, 64),
    "resnet101": ((3, 4, 23, 3), True, 64),
    "resnet152": ((3, 8, 36, 3), True, 64),
    "wide_resnet50_2": ((3, 4, 6, 3), True, 128),
}


class ArchError(CghError):
    """Weights that do not describe a supported ResNet, or do not fit the requested one."""


def feature_dim(arch: str) -> int:
    """Channels of the pooled feature (512 for basic-block ResNets, 2048 for bottleneck ones)."""
    return 2048 if ARCHS[arch][1] else 512


def build_backbone(arch: str) -> nn.Module:
    """A randomly initialised torchvision ResNet whose ``fc`` is the identity (pooled features out)."""
    if arch not in ARCHS:
        raise ArchError(f"unknown architecture '{arch}'; supported: {', '.join(ARCHS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    return model


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in torchvision names, without ``fc.*`` and ``num_batches_tracked``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def infer_arch(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the ResNet that a torchvision-keyed state dict describes (``ArchError`` if none)."""
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            i = int(m.group(1)) - 1
            blocks[i] = max(blocks[i], int(m.group(2)) + 1)
    bottleneck = "layer1.0.conv3.weight" in state_dict
    width = state_dict["layer1.0.conv2.weight"].shape[0] if "layer1.0.conv2.weight" in state_dict else 0
    for arch, (stages, is_bottleneck, w) in ARCHS.items():
        if tuple(blocks) == stages and bottleneck == is_bottleneck and width == w:
            return arch
    raise ArchError(f"weights do not match a supported ResNet (blocks per stage {blocks}, "
                    f"{'bottleneck' if bottleneck else 'basic'} blocks, layer1 width {width})")


def load_backbone_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load every backbone tensor or fail: missing, unexpected or wrongly shaped tensors are errors.

    A backbone that silently keeps its random init would report "from scratch" numbers as if they
    were the checkpoint's, so nothing is tolerated here except the absent classifier.
    """
    expected = backbone_state_dict(model)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(k for k in set(state_dict) - set(expected) if not k.endswith("num_batches_tracked"))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})")
        if wrong:
            parts.append("wrong shape: " + ", ".join(
                f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise ArchError("backbone weights do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)
