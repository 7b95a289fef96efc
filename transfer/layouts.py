"""Where each project keeps its ResNet backbone inside a checkpoint, as one readable table.

A layout says: where the model's state dict sits in the file (``where``: candidate key paths), which
key prefix marks the backbone (``prefixes``: first that fits wins), how the remaining key maps to a
torchvision name (``rename``), and, for layouts that share a shape, what else tells them apart
(``when``). Detection tries the table in order; the first layout that yields a ResNet stem and
``layer1`` wins, so more specific layouts come first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from transfer.convert import from_detectron2_names

Path_ = tuple[str, ...]


def torchvision_name(key: str) -> str:
    return key


# lightly builds its backbone as nn.Sequential(*list(resnet.children())[:-1]), so the children are
# numbered: 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4-7 layer1-4, 8 avgpool.
_LIGHTLY = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def lightly_name(key: str) -> str:
    head, _, rest = key.partition(".")
    return f"{_LIGHTLY[head]}.{rest}" if head in _LIGHTLY else key


def detectron2_name(key: str) -> str:
    return next(iter(from_detectron2_names({key: None})))


def _always(obj: dict) -> bool:
    return True


def _has_key(*names: str) -> Callable[[dict], bool]:
    return lambda obj: any(n in obj for n in names)


def _any_key_matches(pattern: str, where: Path_ = ()) -> Callable[[dict], bool]:
    """True when some key of the dict at ``where`` matches ``pattern`` (a head the layout always has)."""
    rx = re.compile(pattern)

    def check(obj: dict) -> bool:
        sub = dig(obj, where)
        return isinstance(sub, dict) and any(isinstance(k, str) and rx.search(k) for k in sub)
    return check


@dataclass(frozen=True)
class Layout:
    name: str
    method: str                      # what the record calls the pretraining method
    where: tuple[Path_, ...]         # candidate paths of the model state dict inside the file
    prefixes: tuple[str, ...]        # candidate key prefixes of the backbone
    rename: Callable[[str], str] = torchvision_name
    when: Callable[[dict], bool] = _always
    saved_by: str = ""               # how that project writes it (shown by `cgh inspect --list`)


LAYOUTS: tuple[Layout, ...] = (
    # This project's training checkpoints (cgh.train -> cgh.checkpointing): CGHModel.state_dict()
    # under "model"; protocols evaluate the student's backbone.
    Layout("cgh-train", "cgh", (("model",),), ("student_backbone.",),
           when=_any_key_matches(r"^student_backbone\.", ("model",)),
           saved_by="cgh pretrain (checkpoints/epoch_*.pt): {'model': {'student_backbone.*', "
                    "'teacher_backbone.*', heads, queues}, 'optimizer', 'scaler', 'config', 'epoch', ...}"),
    Layout("cgh-release", "cgh", (("net",),), ("module.encoder_q.", "encoder_q."),
           saved_by="CGH authors' release: {'net': {'module.encoder_q.*', 'module.encoder_k.*', "
                    "'module.hypercols_proj_q.*', 'module.queue', ...}}"),
    Layout("ressl", "ressl", (("model",), ("state_dict",)), ("module.encoder_q.net.", "encoder_q.net."),
           saved_by="ReSSL release: {'model': {'module.encoder_q.net.*', 'module.encoder_q.head.*', "
                    "'module.encoder_k.*', 'module.queue'}, ...}"),
    Layout("moco", "moco", (("state_dict",),), ("module.encoder_q.", "encoder_q."),
           saved_by="MoCo v1/v2: {'epoch', 'arch', 'state_dict': {'module.encoder_q.*', "
                    "'module.encoder_k.*', 'module.queue', 'module.queue_ptr'}, 'optimizer'}"),
    Layout("mocov3", "mocov3", (("state_dict",),), ("module.base_encoder.", "base_encoder."),
           saved_by="MoCo v3: {'epoch', 'arch', 'state_dict': {'module.base_encoder.*', "
                    "'module.momentum_encoder.*', 'module.predictor.*'}, 'optimizer', 'scaler'}"),
    Layout("simsiam", "simsiam", (("state_dict",),), ("module.encoder.", "encoder."),
           saved_by="SimSiam: {'epoch', 'arch', 'state_dict': {'module.encoder.*', 'module.predictor.*'}, "
                    "'optimizer'}"),
    Layout("dino", "dino", (("teacher",),), ("module.backbone.", "backbone."),
           when=_has_key("teacher"),
           saved_by="DINO full checkpoint: {'student', 'teacher': {'module.backbone.*', 'module.head.*'}, "
                    "'optimizer', 'epoch', 'args' (Namespace), 'dino_loss'}; the teacher is evaluated, "
                    "as in DINO's own eval scripts (the plain release file is a torchvision state dict)"),
    Layout("swav", "swav", ((), ("state_dict",)), ("module.",),
           when=lambda obj: _any_key_matches(r"^module\.(prototypes|projection_head)")(obj)
           or _any_key_matches(r"^module\.(prototypes|projection_head)", ("state_dict",))(obj),
           saved_by="SwAV: {'module.*' backbone, 'module.projection_head.*', 'module.prototypes.*'} "
                    "(release) or the same under 'state_dict' (training checkpoint)"),
    Layout("vissl", "vissl", (("classy_state_dict", "base_model", "model", "trunk"),),
           ("_feature_blocks.",),
           saved_by="VISSL: {'classy_state_dict': {'base_model': {'model': {'trunk': "
                    "{'_feature_blocks.conv1.weight', ...}, 'heads': {...}}}}, 'phase_idx', ...}"),
    Layout("solo-learn", "solo-learn", (("state_dict",),), ("backbone.",),
           when=lambda obj: _has_key("pytorch-lightning_version", "hyper_parameters")(obj)
           or _any_key_matches(r"^(projector|momentum_backbone)\.", ("state_dict",))(obj),
           saved_by="solo-learn (PyTorch Lightning): {'state_dict': {'backbone.*', 'projector.*', "
                    "'classifier.*'}, 'epoch', 'global_step', 'pytorch-lightning_version', ...}"),
    Layout("mmselfsup", "mmselfsup", (("state_dict",),), ("backbone.",),
           saved_by="mmselfsup / mmpretrain: {'meta', 'state_dict': {'backbone.*', 'neck.*', "
                    "'head.*'}, 'optimizer', 'message_hub'}"),
    Layout("lightly", "lightly", (("state_dict",), ("model",), ()), ("backbone.", ""),
           rename=lightly_name,
           when=lambda obj: any(_any_key_matches(r"(^|\.)4\.0\.conv1\.weight$", w)(obj)
                                for w in (("state_dict",), ("model",), ())),
           saved_by="lightly: backbone = nn.Sequential(*resnet.children()[:-1]) -> 'backbone.0.weight' "
                    "(conv1), 'backbone.4.0.conv1.weight' (layer1), ... in the model's state dict"),
    Layout("detectron2", "unknown", (("model",),), ("",), rename=detectron2_name,
           when=lambda obj: "__author__" in obj or _any_key_matches(r"(^|\.)stem\.conv1\.", ("model",))(obj),
           saved_by="detectron2 .pkl: {'model': {'stem.conv1.weight', 'res2.0.conv1.norm.weight', ...} "
                    "as numpy arrays, '__author__', 'matching_heuristics'} (MoCo's conversion)"),
    Layout("mmseg", "unknown", (("state_dict",),), ("",), when=_has_key("meta"),
           saved_by="mmseg/mmpretrain backbone-only checkpoint (what `cgh convert --to mmseg` writes): "
                    "{'state_dict': {'conv1.weight', 'layer1.0.bn1.weight', ...}, 'meta'}"),
    # Without mmengine's 'meta', a torchvision-named model under 'state_dict' is a training script's
    # checkpoint (timm's train.py, the PyTorch ImageNet example), not an mmseg file.
    Layout("state-dict", "unknown", (("state_dict",),), ("",),
           saved_by="timm train.py / PyTorch ImageNet example checkpoint: {'epoch', 'arch', 'state_dict': "
                    "{'conv1.weight', ..., 'fc.weight'}, 'optimizer', ['version', 'args', 'metric']}"),
    Layout("torchvision", "unknown", ((),), ("",),
           saved_by="torchvision / timm / DINO release: a plain state dict {'conv1.weight', "
                    "'layer1.0.conv1.weight', ..., 'fc.weight'}"),
)

BY_NAME: dict[str, Layout] = {layout.name: layout for layout in LAYOUTS}


def dig(obj, where: Path_):
    """The value at key path ``where`` in nested dicts, or None."""
    for part in where:
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def backbone_candidates(sub: dict, prefix: str, rename: Callable[[str], str]) -> dict[str, str]:
    """torchvision name -> original key for every key of ``sub`` under ``prefix``."""
    out = {}
    for key in sub:
        if isinstance(key, str) and key.startswith(prefix) and not key.endswith("num_batches_tracked"):
            out[rename(key[len(prefix):])] = key
    return out


def looks_like_resnet(names) -> bool:
    return "conv1.weight" in names and "layer1.0.conv1.weight" in names


def match(layout: Layout, obj: dict, check_when: bool = True) -> tuple[Path_, str, dict[str, str]] | None:
    """(where, prefix, {torchvision name: original key}) when ``obj`` holds a backbone in this layout."""
    if check_when and not layout.when(obj):
        return None
    for where in layout.where:
        sub = dig(obj, where)
        if not isinstance(sub, dict):
            continue
        for prefix in layout.prefixes:
            names = backbone_candidates(sub, prefix, layout.rename)
            if looks_like_resnet(names):
                return where, prefix, names
    return None


def find_prefixes(obj, where: Path_ = (), depth: int = 4) -> list[tuple[Path_, str]]:
    """Every (dict path, key prefix) under which a ResNet stem and layer1 sit: the fallback for
    layouts not in the table, and the hint shown when nothing matched.

    Each dict is searched once, at the first path that reaches it: a file that reuses one dict under
    many keys at every level (a few KB describing billions of paths) costs no more than its size.
    """
    found: list[tuple[Path_, str]] = []
    seen: set[int] = set()
    todo = [(obj, where, depth)]   # a stack: depth first, keys in order, as the recursion it replaces
    while todo:
        node, path, left = todo.pop()
        if not isinstance(node, dict) or left < 0 or id(node) in seen:
            continue
        seen.add(id(node))
        for key in node:
            if isinstance(key, str) and key.endswith("layer1.0.conv1.weight"):
                prefix = key[: -len("layer1.0.conv1.weight")]
                if prefix + "conv1.weight" in node:
                    found.append((path, prefix))
        todo += reversed([(value, path + (key,), left - 1) for key, value in node.items()
                          if isinstance(value, dict) and isinstance(key, str) and id(value) not in seen])
    return found
