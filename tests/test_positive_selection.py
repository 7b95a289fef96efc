"""Positive-selection precision/recall (paper Fig. 2) against a plain-Python count."""
from __future__ import annotations

import math

import torch

from eval.positive_selection import (positive_selection, precision_recall, selection_counts,
                                     teacher_distribution)


def _reference(probs, queue_labels, batch_labels, t):
    tp = pred = act = 0
    for i in range(probs.shape[0]):
        for j in range(probs.shape[1]):
            if queue_labels[j] < 0:
                continue
            p = probs[i, j] >= t
            a = queue_labels[j] == batch_labels[i]
            tp += int(p and a)
            pred += int(p)
            act += int(a)
    return 100.0 * tp / pred, 100.0 * tp / act


def test_matches_hand_count_with_empty_slots():
    g = torch.Generator().manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    queue_labels = torch.randint(0, 3, (40,), generator=g)
    queue_labels[:5] = -1                       # never-filled slots
    batch_labels = torch.randint(0, 3, (6,), generator=g)
    probs = teacher_distribution(teacher, queue, 0.1)
    # the distribution is a row-wise softmax of cosine similarities at the given temperature
    manual = torch.exp(teacher @ queue.t() / 0.1)
    assert torch.allclose(probs, manual / manual.sum(1, keepdim=True), atol=1e-6)
    thresholds = [0.01, 0.03, 0.05]
    got = positive_selection(probs, queue_labels, batch_labels, thresholds)
    for t in thresholds:
        ref_p, ref_r = _reference(probs, queue_labels, batch_labels, t)
        assert math.isclose(got[t]["precision"], ref_p, rel_tol=1e-9)
        assert math.isclose(got[t]["recall"], ref_r, rel_tol=1e-9)
    # raising the threshold can only select fewer entries: recall never increases
    recalls = [got[t]["recall"] for t in thresholds]
    assert recalls == sorted(recalls, reverse=True) and recalls[0] > recalls[-1]


def test_perfect_teacher_and_accumulation():
    # a teacher that puts all mass on its own class gets 100% precision and recall
    queue_labels = torch.tensor([0, 1, 0, 1, 2, -1])
    batch_labels = torch.tensor([0, 1])
    probs = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0, 0.0],
                          [0.0, 0.4, 0.0, 0.4, 0.1, 0.1]])
    (p, r), = precision_recall(selection_counts(probs, queue_labels, batch_labels, [0.2]))
    assert (p, r) == (100.0, 100.0)
    # a low threshold also picks the class-2 entry (a false positive); the empty slot never counts
    counts = selection_counts(probs, queue_labels, batch_labels, [0.05])
    assert counts.tolist() == [[4.0, 5.0, 4.0]]
    # counts accumulate over batches before the ratio is taken (micro average)
    (p2, r2), = precision_recall(counts + counts)
    assert (p2, r2) == (80.0, 100.0)
    # nothing selected: precision is undefined, not 0 or 100
    (p3, _), = precision_recall(selection_counts(probs, queue_labels, batch_labels, [0.9]))
    assert math.isnan(p3)
