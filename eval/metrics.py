"""Metrics with one implementation each: top-k accuracy (every classification protocol reports
with it) and the effective rank of a set of embeddings (the pretraining monitor's collapse check)."""
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


def effective_rank(embeddings: torch.Tensor) -> float:
    """RankMe (Garrido et al., ICML 2023): ``exp(entropy(p))`` with ``p = s / sum(s)`` over the
    singular values ``s`` of ``embeddings`` [N, D] (rows as given). The singular values come from
    the eigenvalues of the smaller Gram matrix, so a 131072 x 512 queue costs one [512, 512]
    product instead of a tall SVD; in float64, because a collapsed queue's near-zero singular
    values are square roots of eigenvalues that float32 rounding would lift to ~1e-3 of the top.

    Why: a self-supervised embedding can collapse onto a few directions while its loss looks
    normal; the effective rank says how many directions the queue really uses (between 1 and
    min(N, D)). Terms with ``p = 0`` contribute nothing.
    """
    if embeddings.ndim != 2 or min(embeddings.shape) == 0:
        raise ValueError(f"effective rank needs a non-empty [N, D] matrix, got {tuple(embeddings.shape)}")
    x = embeddings.detach().double()
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
