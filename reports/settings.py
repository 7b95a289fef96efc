"""What a checkpoint is, in the paper's words: method label, variant and training settings.

Records carry the checkpoint's identity (``LoadedCheckpoint.identity()``), including ``train``, the
compact pretraining config of our own checkpoints (method, loss_mode, layers, tau_h, multi_crop,
predictor, epochs, dataset, arch). From it we name the row the paper would print ("CGH",
"ReSSL", "CGH-pred", "CGH (Multi)") and the ablation variant (context mode, tau_h, layers).
Third-party checkpoints have no ``train`` block; they are named by method and told apart by file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_LAYERS = ("layer3", "layer4")   # paper Sec. 4.1.1: third and fourth blocks
DEFAULT_TAU_H = 0.08

# method names used by checkpoints / the hub -> the paper's spelling
METHOD_LABELS = {
    "cgh": "CGH", "ressl": "ReSSL", "moco": "MoCo-v2", "mocov2": "MoCo-v2", "moco_v2": "MoCo-v2",
    "mocov3": "MoCo-v3", "moco_v3": "MoCo-v3", "simclr": "SimCLR", "swav": "SwAV", "byol": "BYOL",
    "simsiam": "SimSiam", "dino": "DINO", "obow": "OBoW", "hcsc": "HCSC", "nnclr": "NNCLR",
    "supervised": "Supervised", "random": "Random init", "random-init": "Random init",
    "random_init": "Random init",
}

# layouts whose 1000-class classifier makes the hub guess "supervised" -> who writes such files
SUPERVISED_SOURCES = {"torchvision": "torchvision", "state-dict": "timm / PyTorch example"}

ARCH_LABELS = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
               "resnet101": "ResNet-101", "resnet152": "ResNet-152", "wide_resnet50_2": "WRN-50-2"}


def normalize_layers(layers) -> tuple[str, ...] | None:
    """``["layer3", 4, "L2"]`` -> ``("layer2", "layer3", "layer4")``; None when unknown."""
    if layers is None:
        return None
    if isinstance(layers, (str, int)):
        layers = [layers]
    out = set()
    for item in layers:
        m = re.search(r"([1-4])$", str(item))
        if m:
            out.add(f"layer{m.group(1)}")
    return tuple(sorted(out)) or None


def layers_label(layers: tuple[str, ...]) -> str:
    """``("layer2", "layer4")`` -> ``"L2+L4"`` (Table 7's notation)."""
    return "+".join(f"L{name[-1]}" for name in layers)


def _multi_crop(value) -> bool:
    if isinstance(value, dict):
        return any(_multi_crop(v) for k, v in value.items() if k in ("enabled", "num_crops", "num_local_crops",
                                                                      "local_crops", "nmb_crops", "num"))
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and any(bool(v) for v in value)
    return bool(value)


@dataclass(frozen=True)
class Settings:
    """Identity of a pretrained backbone as far as the paper's tables care."""
    label: str                      # row name in our words, e.g. "CGH", "ReSSL (Multi)"
    method: str                     # raw method string
    arch: str
    dataset: str | None = None      # pretraining dataset
    epochs: int | None = None
    loss_mode: str | None = None    # cross | same | global
    layers: tuple[str, ...] | None = None
    tau_h: float | None = None
    multi_crop: bool = False
    predictor: bool = False
    known: bool = True              # False: third-party file, no training config
    file_id: str = ""               # sha256 of a file without training config (keeps files apart)
    layout: str = ""
    name: str = ""

    @property
    def base_label(self) -> str:
        """Label without the multi-crop mark (Table 2 lists multi-crop methods by name only)."""
        return self.label.replace(" (Multi)", "")

    def describe(self) -> str:
        """Short settings line: "synthshapes · ResNet-18 · 2 ep"."""
        arch = ARCH_LABELS.get(self.arch, self.arch)
        if not self.known:
            parts = [arch] + ([f"{self.epochs} ep"] if self.epochs is not None else [])
            return " · ".join(parts + [f"{self.name or 'file'} ({self.layout or '?'} layout, no training config)"])
        return " · ".join([self.dataset or "dataset ?", arch,
                           f"{self.epochs} ep" if self.epochs is not None else "epochs ?"])


def method_source(ckpt: dict) -> str:
    """"file" / "user" when the checkpoint's method is known (its own metadata, or the user said so
    with --method), "layout" when only its layout suggests one. Records written before the hub
    recorded this: the layouts that carry metadata count as "file"."""
    source = ckpt.get("method_source")
    if source in ("file", "user", "layout"):
        return source
    return "file" if ckpt.get("layout") in ("canonical", "cgh-train", "solo-learn", "mmseg") else "layout"


def checkpoint_settings(ckpt: dict) -> Settings:
    """Settings of the checkpoint block of a record."""
    train = ckpt.get("train") or {}
    method = str(train.get("method") or ckpt.get("method") or "unknown")
    arch = str(train.get("arch") or ckpt.get("arch") or "?")
    epochs = train.get("epochs", ckpt.get("epoch"))
    if not train:
        label = METHOD_LABELS.get(method.lower(), method)
        if method_source(ckpt) == "layout":
            # any file in MoCo's layout is not therefore MoCo-v2: never put it in a paper row
            layout = str(ckpt.get("layout") or "?")
            label = f"method unknown ({layout} layout)"
            if method == "supervised" and layout in SUPERVISED_SOURCES:     # an ImageNet classifier's file
                label = f"supervised ({SUPERVISED_SOURCES[layout]})"
        return Settings(label=label, method=method, arch=arch, epochs=epochs, known=False,
                        file_id=str(ckpt.get("sha256", "")), layout=str(ckpt.get("layout", "")),
                        name=str(ckpt.get("name", "")))
    dataset = train.get("dataset")
    if isinstance(dataset, dict):
        dataset = dataset.get("name") or dataset.get("root")
    mode = train.get("loss_mode")
    if mode is None and method.lower() == "ressl":
        mode = "global"
    layers = normalize_layers(train.get("layers"))
    tau_h = train.get("tau_h")
    tau_h = float(tau_h) if tau_h is not None else None
    multi = _multi_crop(train.get("multi_crop"))
    predictor = bool(train.get("predictor"))
    if mode == "global":
        label = "ReSSL"                 # paper Sec. 4.5.1: global-context is identical to ReSSL
    elif mode == "same":
        label = "CGH (same-context)"
    else:
        label = METHOD_LABELS.get(method.lower(), method)
    if predictor:
        label += "-pred"
    if mode in ("cross", "same"):
        if layers is not None and layers != DEFAULT_LAYERS:
            label += f" ({layers_label(layers)})"
        if tau_h is not None and abs(tau_h - DEFAULT_TAU_H) > 1e-9:
            label += f" (τ_h={tau_h:g})"
    if multi:
        label += " (Multi)"
    return Settings(label=label, method=method, arch=arch, dataset=None if dataset is None else str(dataset),
                    epochs=epochs, loss_mode=mode, layers=layers, tau_h=tau_h, multi_crop=multi,
                    predictor=predictor)
