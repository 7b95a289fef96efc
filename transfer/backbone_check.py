"""Prove that a transfer model really starts from the checkpoint: compare every backbone tensor.

detectron2 and mmengine both load pretrained weights leniently (unmatched names are only logged),
so a naming mistake would train from random init and report a plausible, wrong number. Before
training, each protocol lists the backbone tensors of the model it built, maps them to the
torchvision names of the checkpoint, and requires bit-equality for every one of them.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np
import torch

from cgh.errors import CghError
from cgh.io import atomic_write_json


class BackboneMismatchError(CghError):
    """The model's backbone does not hold the checkpoint's weights (not loaded, or loaded wrongly)."""


def _as_tensor(v) -> torch.Tensor:
    return torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v.detach().cpu()


def compare_backbone(model_tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                     to_reference_name: Callable[[str], str | None]) -> dict:
    """Compare a model's backbone tensors with the reference (torchvision names).

    ``model_tensors`` are the model's backbone tensors under the model's own names;
    ``to_reference_name`` maps such a name to the torchvision name (``None`` for tensors that are
    not part of the pretrained backbone, e.g. a new head's norm). Returns a report dict with
    ``ok``, ``compared``, ``mismatched`` (name, max abs difference), ``missing_in_model`` and
    ``missing_in_checkpoint``.
    """
    ref = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    seen, mismatched, missing_ckpt = set(), [], []
    for name, value in model_tensors.items():
        if name.endswith("num_batches_tracked"):
            continue
        ref_name = to_reference_name(name)
        if ref_name is None:
            continue
        if ref_name not in ref:
            missing_ckpt.append(name)
            continue
        seen.add(ref_name)
        a, b = _as_tensor(value), _as_tensor(ref[ref_name])
        if a.shape != b.shape:
            mismatched.append({"name": name, "reference": ref_name,
                               "problem": f"shape {tuple(a.shape)} vs {tuple(b.shape)}"})
        elif not torch.equal(a.to(b.dtype), b):
            diff = (a.double() - b.double()).abs().max().item()
            mismatched.append({"name": name, "reference": ref_name, "max_abs_diff": diff})
    missing_model = sorted(set(ref) - seen)
    return {
        "ok": not (mismatched or missing_ckpt or missing_model),
        "compared": len(seen),
        "reference_tensors": len(ref),
        "mismatched": mismatched,
        "missing_in_model": missing_model,
        "missing_in_checkpoint": sorted(missing_ckpt),
    }


def require_equal_backbone(report: dict, report_path: str | os.PathLike | None = None) -> dict:
    """Save the report (when a path is given), then raise ``BackboneMismatchError`` unless it is ok."""
    if report_path is not None:
        atomic_write_json(report_path, report)
    if not report["ok"]:
        parts = []
        if report["mismatched"]:
            names = ", ".join(m["name"] for m in report["mismatched"][:3])
            parts.append(f"{len(report['mismatched'])} of {report['compared']} backbone tensors differ "
                         f"from the checkpoint (e.g. {names}): the weights did not load")
        if report["missing_in_model"]:
            parts.append(f"{len(report['missing_in_model'])} checkpoint tensors have no place in the "
                         f"model (e.g. {', '.join(report['missing_in_model'][:3])})")
        if report["missing_in_checkpoint"]:
            parts.append(f"{len(report['missing_in_checkpoint'])} model backbone tensors are not in "
                         f"the checkpoint (e.g. {', '.join(report['missing_in_checkpoint'][:3])})")
        where = f"; report: {report_path}" if report_path else ""
        raise BackboneMismatchError("backbone check failed: " + "; ".join(parts) + where)
    return report
