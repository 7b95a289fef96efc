"""The effective rank (RankMe) the pretraining monitor logs for its queues."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.metrics import effective_rank


def _rankme_reference(x: np.ndarray) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(300, 16), (7, 40)])   # tall (Gram D x D) and wide (N x N)
def test_effective_rank_equals_the_svd_formula(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, shape[1])
    assert effective_rank(x) == pytest.approx(_rankme_reference(x.numpy()), rel=1e-6)


def test_effective_rank_counts_equally_used_directions_and_ignores_scale():
    basis = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))[0]
    for k in (1, 3, 8):
        x = torch.cat([basis[:k]] * 10)          # 10 copies of k orthonormal directions
        assert effective_rank(x) == pytest.approx(k, abs=1e-3)
        assert effective_rank(5.0 * x) == pytest.approx(k, abs=1e-3)
    # a collapsed queue: every key the same vector -> 1
    assert effective_rank(torch.ones(256, 128)) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_rejects_empty_input():
    with pytest.raises(ValueError, match="non-empty"):
        effective_rank(torch.zeros(0, 8))
