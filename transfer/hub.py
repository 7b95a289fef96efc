"""Read any ResNet checkpoint as torchvision backbone tensors: the single entry point for protocols.

Every protocol calls ``load_backbone(path)``; it detects the file's layout (ours, torchvision/timm,
MoCo, ReSSL, CGH release, DINO, SwAV, solo-learn, mmselfsup, VISSL, lightly, detectron2 .pkl; see
``transfer.layouts``), extracts the backbone in torchvision key names and says what it ignored.
Third-party files are untrusted: they are opened by ``transfer.safe_load``, which runs nothing in them.

A backbone that loads nothing would train "from scratch" and report a plausible, wrong number, so
``load_backbone`` fails when any backbone tensor is missing, mis-shaped or holds NaN/Inf;
``inspect_checkpoint`` reports the same findings without failing (for ``cgh inspect``). What a file
says about itself (method, epoch, training config) is read as inert, bounded data (``cgh.inert``):
it lands in records, and must neither hang the reader nor pull values from its environment.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cgh.backbone import ArchError, backbone_state_dict, build_backbone, infer_arch, load_backbone_weights
from cgh.canonical import FORMAT as CANONICAL_FORMAT
from cgh.canonical import read_sidecar
from cgh.errors import CghError
from cgh.inert import MAX_STRING, train_summary
from cgh.io import sha256_file
from cgh.records import display_text
from transfer import layouts
from transfer.safe_load import CheckpointError, read_checkpoint

__all__ = ["CheckpointError", "LoadedCheckpoint", "Inspection", "inspect_checkpoint", "load_backbone",
           "LAYOUT_NAMES"]

LAYOUT_NAMES = ("canonical", *layouts.BY_NAME, "custom")


@dataclass
class LoadedCheckpoint:
    """A backbone read from some checkpoint file, in torchvision names."""
    path: Path
    state_dict: dict[str, torch.Tensor]
    arch: str
    layout: str                      # detected or forced layout name, e.g. "canonical", "moco"
    sha256: str                      # of the file as given
    method: str = "unknown"          # from metadata where the file says, else the layout's method
    # "file": the file names its method (sidecar, training config, solo-learn/mmseg metadata);
    # "layout": only the layout suggests it (any file in MoCo's layout is not therefore MoCo-v2)
    method_source: str = "layout"
    epoch: int | None = None
    train_config: dict | None = None  # pretraining config when the checkpoint carries one
    ignored: list[str] = field(default_factory=list)   # keys present but not part of the backbone

    @property
    def name(self) -> str:
        return self.path.stem

    def identity(self) -> dict:
        """The ``checkpoint`` block of a result record."""
        ident = {"path": str(self.path), "sha256": self.sha256, "method": self.method,
                 "method_source": self.method_source,
                 "arch": self.arch, "layout": self.layout, "name": self.name, "epoch": self.epoch}
        if self.train_config:
            ident["train"] = self.train_config
        return ident


@dataclass
class Inspection:
    """What ``cgh inspect`` shows: the extracted backbone plus everything that did not fit."""
    checkpoint: LoadedCheckpoint
    where: str                                   # "state_dict/module.encoder_q." style location
    missing: list[str] = field(default_factory=list)       # expected backbone tensors not found
    wrong_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, found, expected
    non_finite: list[str] = field(default_factory=list)    # float tensors holding NaN or Inf

    @property
    def ok(self) -> bool:
        return not self.missing and not self.wrong_shape and not self.non_finite


def load_backbone(path: str | os.PathLike, fmt: str | None = None, key: str | None = None,
                  prefix: str | None = None) -> LoadedCheckpoint:
    """Read ``path`` and return its backbone; ``fmt`` forces a layout, ``key``/``prefix`` pick
    the sub-dict and key prefix by hand for layouts not known here.

    Raises ``CheckpointError`` when the file cannot be read safely, holds no ResNet backbone, or
    any backbone tensor is missing, has the wrong shape (never falls back to random init) or holds
    NaN/Inf (a protocol would spend hours on it and report garbage).
    """
    report = inspect_checkpoint(path, fmt=fmt, key=key, prefix=prefix)
    ck = report.checkpoint
    model = _shape_model(ck.arch)
    try:
        with warnings.catch_warnings():   # loading into meta tensors is a shape check, not a copy
            warnings.simplefilter("ignore")
            load_backbone_weights(model, ck.state_dict)
    except ArchError as e:
        raise CheckpointError(f"{ck.path} ({ck.layout} layout, {report.where or 'top level'}): {e}; "
                              "run `cgh inspect` on it to see every tensor") from None
    if report.non_finite:
        bad = report.non_finite
        raise CheckpointError(f"{ck.path}: {len(bad)} backbone tensors hold NaN or Inf values (first: "
                              f"{', '.join(bad[:3])}); protocols refuse non-finite weights")
    return ck


def inspect_checkpoint(path: str | os.PathLike, fmt: str | None = None, key: str | None = None,
                       prefix: str | None = None) -> Inspection:
    """Detect the layout and extract the backbone, reporting missing/mis-shaped tensors instead of failing."""
    path = Path(path)
    if fmt is not None and fmt not in LAYOUT_NAMES:
        raise CheckpointError(f"unknown checkpoint layout '{fmt}'; known: {', '.join(LAYOUT_NAMES)}")
    obj = read_checkpoint(path)
    sha = sha256_file(path)
    if path.suffix == ".safetensors" and fmt in (None, "canonical") and key is None and prefix is None:
        canonical = _read_canonical(path, obj, sha, forced=fmt == "canonical")
        if canonical is not None:
            return canonical
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
                              "a saved whole model (torch.save(model)) is not supported, save its state_dict")
    where, used_prefix, names, layout = _locate(path, obj, fmt, key, prefix)
    sub = layouts.dig(obj, where)
    return _extract(path, obj, sha, layout, where, used_prefix, names, sub)


# ---- detection ------------------------------------------------------------------------------------

def _read_canonical(path: Path, tensors: dict, sha: str, forced: bool) -> Inspection | None:
    """Our canonical file (safetensors + sidecar); None when it is some other safetensors file.
    The sidecar must describe this very file (its sha256, hashed once here)."""
    meta_format = _safetensors_format(path)
    if meta_format != CANONICAL_FORMAT and not forced:
        return None
    try:
        meta = read_sidecar(path, sha256=sha) or {}
        arch = infer_arch(tensors)
    except (ValueError, OSError) as e:   # CghError/ArchError and a malformed JSON sidecar are ValueErrors
        raise CheckpointError(f"{path}: not a valid canonical checkpoint ({e})") from None
    ck = LoadedCheckpoint(path=path, state_dict=tensors, arch=arch, layout="canonical", sha256=sha,
                          method=meta.get("method") or "unknown", epoch=meta.get("epoch"),
                          method_source=_stated_source(meta),
                          train_config=meta.get("train_config"))
    return _with_shape_check(ck, "")


def _safetensors_format(path: Path) -> str | None:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("format")


def _parse_key(obj: dict, key: str) -> tuple[str, ...]:
    """``--key``: an exact top-level key, or a path split on '/' (or '.') through nested dicts."""
    if key in obj:
        return (key,)
    for sep in ("/", "."):
        parts = tuple(p for p in key.split(sep) if p)
        if isinstance(layouts.dig(obj, parts), dict):
            return parts
    raise CheckpointError(f"--key {key!r}: no such dict in the checkpoint; top-level keys: {_keys(obj)}")


def _keys(d: dict, n: int = 12) -> str:
    ks = [_show(k) for k in list(d)[:n]]
    return ", ".join(ks) + (f", ... ({len(d)} keys)" if len(d) > n else "")


def _show(key) -> str:
    """A key from the file, fit for a one-line message (no control characters, at most 80 characters)."""
    return display_text(key, 80)


def _locate(path: Path, obj: dict, fmt, key, prefix):
    """(where, prefix, {torchvision name: original key}, Layout) of the backbone in ``obj``."""
    if key is not None or prefix is not None:
        layout = layouts.BY_NAME.get(fmt) if fmt not in (None, "custom") else None
        where = _parse_key(obj, key) if key is not None else ()
        sub = layouts.dig(obj, where)
        if not isinstance(sub, dict):
            raise CheckpointError(f"{path}: the checkpoint root is not a dict; pass --key")
        rename = layout.rename if layout else layouts.torchvision_name
        names = layouts.backbone_candidates(sub, prefix or "", rename)
        if not names:
            raise CheckpointError(f"{path}: no key under {'/'.join(where) or 'the top level'} starts with "
                                  f"{prefix!r}; keys there: {_keys(sub)}")
        custom = layout or layouts.Layout("custom", "unknown", (where,), (prefix or "",))
        return where, prefix or "", names, custom
    if fmt not in (None, "custom"):
        if fmt == "canonical":
            raise CheckpointError(f"{path}: --from canonical needs a .safetensors file")
        layout = layouts.BY_NAME[fmt]
        found = layouts.match(layout, obj, check_when=False)
        if found is None:
            raise CheckpointError(
                f"{path}: does not hold a {fmt} checkpoint: expected a ResNet under "
                f"{' or '.join('/'.join(w) or 'the top level' for w in layout.where)} with key prefix "
                f"{' or '.join(repr(p) for p in layout.prefixes)} ({layout.saved_by}); top-level keys: {_keys(obj)}")
        return (*found, layout)
    for layout in layouts.LAYOUTS:
        found = layouts.match(layout, obj)
        if found is not None:
            return (*found, layout)
    candidates = layouts.find_prefixes(obj)
    if len(candidates) == 1:
        where, pre = candidates[0]
        names = layouts.backbone_candidates(layouts.dig(obj, where), pre, layouts.torchvision_name)
        return where, pre, names, layouts.Layout("generic", "unknown", (where,), (pre,))
    if candidates:
        options = "; ".join(f"--key {'/'.join(w) or '(top level)'} --prefix {p!r}" for w, p in candidates)
        raise CheckpointError(f"{path}: several ResNet backbones found, choose one with: {options}")
    raise CheckpointError(
        f"{path}: no ResNet backbone found (looked for torchvision-style 'conv1.weight' and "
        f"'layer1.0.conv1.weight' in every known layout); top-level keys: {_keys(obj)}. "
        "Use --from FORMAT, or --key/--prefix to point at the backbone")


# ---- extraction -----------------------------------------------------------------------------------

def _as_tensor(value, name: str, path: Path) -> torch.Tensor:
    """A dense CPU tensor with data; anything else in a backbone slot is one clear error."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if not isinstance(value, torch.Tensor):
        what = f"numpy array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise CheckpointError(f"{path}: backbone entry '{_show(name)}' is a {what}, not a tensor")
    problem = ("a meta tensor (a shape without data)" if value.is_meta else
               f"a {value.layout} tensor" if value.layout != torch.strided else
               "a quantized tensor" if value.is_quantized else
               f"a {value.dtype} tensor" if value.is_complex() else None)
    if problem:
        raise CheckpointError(f"{path}: backbone entry '{_show(name)}' is {problem}, not dense weights")
    return value


def _extract(path: Path, obj: dict, sha: str, layout, where, prefix: str, names: dict[str, str],
             sub: dict) -> Inspection:
    arrays = {n: sub[orig] for n, orig in names.items() if isinstance(sub[orig], (torch.Tensor, np.ndarray))}
    try:
        arch = infer_arch(arrays)
    except ArchError as e:
        others = [_show(orig) for n, orig in names.items() if n not in arrays][:3]
        hint = f" (entries that are not tensors: {', '.join(others)})" if others else ""
        raise CheckpointError(f"{path} ({layout.name} layout): {e}{hint}") from None
    expected = backbone_state_dict(_shape_model(arch))
    state_dict = {n: _as_tensor(sub[orig], orig, path) for n, orig in names.items() if n in expected}
    used = {names[n] for n in state_dict}
    base = "/".join(where)
    ignored = []
    # siblings along the path (optimizer, the teacher, heads ...), then unused keys of the model dict
    node = obj
    for depth, part in enumerate(where):
        ignored += ["/".join((*where[:depth], str(k))) for k in node if k != part]
        node = node[part]
    ignored += [f"{base}/{k}" if base else str(k) for k in sub
                if k not in used and not (isinstance(k, str) and k.startswith(prefix)
                                          and k.endswith("num_batches_tracked"))]
    train_config = _train_config(path, obj, layout)
    method, method_source = _method(path, obj, layout, train_config, sub, prefix)
    ck = LoadedCheckpoint(path=path, state_dict=state_dict, arch=arch, layout=layout.name, sha256=sha,
                          method=method, method_source=method_source, epoch=_epoch(obj),
                          train_config=train_config, ignored=ignored)
    return _with_shape_check(ck, f"{base}/{prefix}" if base else prefix)


def _with_shape_check(ck: LoadedCheckpoint, where: str) -> Inspection:
    expected = backbone_state_dict(_shape_model(ck.arch))
    missing = sorted(set(expected) - set(ck.state_dict))
    wrong = [(k, tuple(ck.state_dict[k].shape), tuple(expected[k].shape)) for k in expected
             if k in ck.state_dict and ck.state_dict[k].shape != expected[k].shape]
    non_finite = [k for k, t in ck.state_dict.items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return Inspection(checkpoint=ck, where=where, missing=missing, wrong_shape=wrong, non_finite=non_finite)


def _shape_model(arch: str) -> torch.nn.Module:
    """The torchvision ResNet on the meta device: names and shapes only, no memory, no init cost."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return build_backbone(arch)


def _epoch(obj: dict) -> int | None:
    """The epoch the file states; a value no training reaches (negative, >= 1e9) is no epoch."""
    for value in (obj.get("epoch"), layouts.dig(obj, ("meta", "epoch")), obj.get("train_phase_idx")):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.layout == torch.strided \
                and not value.is_meta:
            value = value.item()
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < 10**9:
            return int(value)
    return None


def _stated_source(meta: dict) -> str:
    """How the method in our own metadata (sidecar, mmseg ``meta``) was known: a conversion of a
    file whose method only its layout suggested keeps saying so ("layout")."""
    if not meta.get("method"):
        return "layout"
    return "layout" if meta.get("method_source") == "layout" else "file"


IMAGENET_CLASSES = 1000
SUPERVISED_LAYOUTS = ("torchvision", "state-dict")   # plain model state dicts that keep their classifier


def _method(path: Path, obj: dict, layout, train_config: dict | None, sub: dict | None = None,
            prefix: str = "") -> tuple[str, str]:
    """(method, "file") where the file states its method, else (the layout's guess, "layout"). A
    plain state dict with a 1000-class ``fc`` is guessed "supervised" (torchvision's and timm's
    ImageNet classifiers), still only a guess from the layout (a linear probe's file looks the same)."""
    if layout.name in SUPERVISED_LAYOUTS and sub is not None:
        fc = sub.get(f"{prefix}fc.weight")
        if isinstance(fc, (torch.Tensor, np.ndarray)) and len(fc.shape) == 2 and fc.shape[0] == IMAGENET_CLASSES:
            return "supervised", "layout"
    method = None
    if layout.name == "solo-learn":
        hp = obj.get("hyper_parameters")
        method = hp.get("method") if isinstance(hp, dict) else None
    elif layout.name == "mmseg":
        method = layouts.dig(obj, ("meta", "method"))   # written by `cgh convert --to mmseg`
    elif layout.name == "cgh-train":
        method = (train_config or {}).get("method")
    if not isinstance(method, str) or not method:
        return layout.method, "layout"
    if layout.name == "mmseg" and _stated_source(obj["meta"]) == "layout":
        return method, "layout"
    if len(method) > MAX_STRING:
        raise CheckpointError(f"{path}: its method name has {len(method)} characters (at most {MAX_STRING})")
    return method, "file"


def _train_config(path: Path, obj: dict, layout) -> dict | None:
    """For our training checkpoints: the summary the exported canonical sidecar carries, read from
    the stored config as inert data (``cgh.inert.train_summary``: bounded, nothing resolved)."""
    if layout.name != "cgh-train" or obj.get("config") is None:
        return None
    try:
        return train_summary(obj["config"])
    except CghError as e:
        raise CheckpointError(f"{path}: its stored training config {e}") from None
