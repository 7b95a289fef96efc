"""DualQueue: wrap-around, lock-step of the two banks with labels/indices, gathering across processes."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cgh.batchnorm import batch_shuffle_ddp, batch_unshuffle_ddp
from cgh.errors import CghError
from cgh.queue import DualQueue, validate_queue

K, D, B = 12, 4, 4


def batch(step):
    """Keys that encode their image id ``n`` so each slot can be checked independently."""
    ids = torch.arange(step * B, (step + 1) * B)
    g = torch.zeros(B, D)
    g[:, 0] = ids.float()
    h = torch.zeros(B, D)
    h[:, 1] = ids.float()
    return g, h, ids % 5, ids + 1000  # labels, dataset indices


def test_initial_state():
    q = DualQueue(K, D)
    torch.testing.assert_close(q.global_keys.norm(dim=1), torch.ones(K))
    torch.testing.assert_close(q.hyper_keys.norm(dim=1), torch.ones(K))
    assert not torch.equal(q.global_keys, q.hyper_keys)
    assert (q.labels == -1).all() and (q.indices == -1).all() and int(q.ptr) == 0
    assert set(dict(q.named_buffers())) == {"global_keys", "hyper_keys", "labels", "indices", "ptr"}


def test_wrap_around_and_lock_step():
    q = DualQueue(K, D)
    for step in range(4):  # 16 images into 12 slots: the 4th batch overwrites the oldest
        q.enqueue(*batch(step))
        assert int(q.ptr) == (step + 1) * B % K
    ids = q.global_keys[:, 0].long()
    assert ids.tolist() == [12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    # Lock-step: every slot describes the same image in both banks and in labels/indices.
    assert torch.equal(q.hyper_keys[:, 1].long(), ids)
    assert torch.equal(q.labels, ids % 5)
    assert torch.equal(q.indices, ids + 1000)


def test_snapshot_is_taken_before_the_update():
    q = DualQueue(K, D)
    snap = q.snapshot()
    q.enqueue(*batch(0))
    assert not torch.equal(snap["queue_global"], q.global_keys)
    assert (snap["queue_labels"] == -1).all()
    torch.testing.assert_close(snap["queue_global"][B:], q.global_keys[B:])


def test_global_only_queue():
    q = DualQueue(K, D, hyper=False)
    g, _, labels, idx = batch(0)
    q.enqueue(g, None, labels, idx)
    assert q.hyper_keys is None and q.snapshot()["queue_hyper"] is None
    with pytest.raises(CghError, match="hypercolumn"):
        q.enqueue(g, g, labels, idx)


def test_queue_not_divisible_by_batch():
    q = DualQueue(10, D)
    with pytest.raises(CghError, match=r"queue_size \(10\) must be a positive multiple of the global batch size \(4"):
        q.enqueue(*batch(0))
    validate_queue(131072, 256)
    with pytest.raises(CghError, match="multiple"):
        validate_queue(131072, 384)


def _two_process_worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        q = DualQueue(16, D)
        g, h, labels, idx = batch(rank)  # rank r holds images 4r..4r+3
        q.enqueue(F.normalize(g + 0.1, dim=1), F.normalize(h + 0.1, dim=1), labels, idx)
        # Both processes wrote the gathered global batch (rank order) at the same slots.
        assert q.indices[:8].tolist() == list(range(1000, 1008)), q.indices
        assert int(q.ptr) == 8
        with pytest.raises(CghError, match=r"global batch size \(8"):
            DualQueue(12, D).enqueue(g, h, labels, idx)

        x = torch.arange(B * 2.0).view(B, 2) + 100 * rank
        shuffled, idx_un = batch_shuffle_ddp(x)
        everything = [torch.empty_like(shuffled) for _ in range(2)]
        dist.all_gather(everything, shuffled)
        seen = sorted(torch.cat(everything)[:, 0].tolist())
        assert seen == sorted(torch.cat([torch.arange(0, 8, 2.0), torch.arange(100, 108, 2.0)]).tolist())
        assert torch.equal(batch_unshuffle_ddp(shuffled, idx_un), x)
    finally:
        dist.destroy_process_group()


def test_gather_and_shuffle_across_two_processes(tmp_path):
    mp.spawn(_two_process_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)
