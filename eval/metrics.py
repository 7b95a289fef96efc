"""Top-k accuracy: the one implementation every classification protocol reports with."""
from __future__ import annotations

from typing import Sequence

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Number of rows of ``scores`` [N, C] whose label is among the ``k`` highest scores, per k.

    Counts stay tensors on the scores' device so a training loop can sum them without a host sync.
    ``k`` larger than the number of classes counts every row as correct (top-5 of a 3-class task).
    """
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices                   # [N, kmax], best first
    hit = top.eq(labels.to(top.device).view(-1, 1))          # [N, kmax]
    return {k: hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent (0-100) for each k."""
    n = scores.shape[0]
    if n == 0:
        raise ValueError("top-k accuracy of an empty set")
    return {k: 100.0 * c.item() / n for k, c in topk_correct(scores, labels, ks).items()}
