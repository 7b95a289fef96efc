"""Positive-sample selection by the teacher (paper Sec. 4.6, Fig. 2): precision and recall.

The paper thresholds "the similarity distribution of the teacher" over the memory bank; entries
above the threshold are the predicted positives, and an entry is truly positive when it has the
query's class. The paper gives no threshold value, so the thresholding is fixed here as follows:

* the distribution is the teacher's target distribution itself, ``p = softmax(sim / tau)`` over
  the queue (row-wise; ``tau`` = tau_h for the hypercolumn distribution CGH learns from,
  tau_t for ReSSL's global one), i.e. exactly what the student is trained to match;
* queue entry ``j`` is a predicted positive for query ``i`` when ``p[i, j] >= threshold``;
* queue slots never filled yet (label < 0) are left out of every count;
* precision = TP / predicted positives, recall = TP / actual positives, both micro-averaged over
  all queries of the batch (sums of counts, then one ratio), in percent. With no predicted
  positive, precision is undefined and reported as NaN (likewise recall without actual positives).

Several thresholds can be evaluated at once; counts are returned so callers can accumulate them
over many batches before taking the ratios.
"""
from __future__ import annotations

from typing import Sequence

import torch


def teacher_distribution(teacher: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(teacher @ queue.T / temperature)``: [B, dim] x [K, dim] -> [B, K], in float32."""
    return torch.softmax(teacher.float() @ queue.float().t() / temperature, dim=1)


def selection_counts(probs: torch.Tensor, queue_labels: torch.Tensor, batch_labels: torch.Tensor,
                     thresholds: Sequence[float]) -> torch.Tensor:
    """Counts for each threshold: tensor [T, 3] = (true positives, predicted positives, actual positives).

    probs [B, K] teacher distribution; queue_labels [K] (negative = empty slot); batch_labels [B].
    Stays on the tensors' device (no host synchronisation).
    """
    valid = (queue_labels >= 0).unsqueeze(0)                              # [1, K]
    actual = (batch_labels.unsqueeze(1) == queue_labels.unsqueeze(0)) & valid   # [B, K]
    rows = []
    for t in thresholds:
        predicted = (probs >= t) & valid
        rows.append(torch.stack([(predicted & actual).sum(), predicted.sum(), actual.sum()]))
    return torch.stack(rows).to(torch.float64)


def precision_recall(counts: torch.Tensor) -> list[tuple[float, float]]:
    """Per threshold (precision %, recall %) from accumulated ``selection_counts``."""
    out = []
    for tp, pred, act in counts.tolist():
        precision = 100.0 * tp / pred if pred > 0 else float("nan")
        recall = 100.0 * tp / act if act > 0 else float("nan")
        out.append((precision, recall))
    return out


def positive_selection(probs: torch.Tensor, queue_labels: torch.Tensor, batch_labels: torch.Tensor,
                       thresholds: Sequence[float]) -> dict[float, dict[str, float]]:
    """One-shot form: ``{threshold: {"precision": %, "recall": %}}`` for one batch."""
    pr = precision_recall(selection_counts(probs, queue_labels, batch_labels, thresholds))
    return {float(t): {"precision": p, "recall": r} for t, (p, r) in zip(thresholds, pr)}
