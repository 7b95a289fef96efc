"""The two memory banks of CGH: teacher embeddings of past batches, global and hypercolumn.

Both queues are written in lock-step with the same (gathered) batch, so slot ``i`` holds the same
image in the global queue, the hypercolumn queue, the label store and the index store. Labels and
dataset indices are never used by the loss; the trainer reads them to measure how well the
teacher's similarity distribution selects positives (paper Fig. 2).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cgh.distributed import is_dist, world_size
from cgh.errors import CghError


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on each of P processes -> ``[P * B, ...]`` (rank order) everywhere; no gradient.
    Identity on one process."""
    if not is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def validate_queue(queue_size: int, global_batch: int) -> None:
    """The queue is refilled one whole global batch at a time, so its size must be a multiple."""
    if global_batch <= 0 or queue_size <= 0 or queue_size % global_batch:
        raise CghError(f"queue_size ({queue_size}) must be a positive multiple of the global batch "
                       f"size ({global_batch} = per-device batch x processes); e.g. "
                       f"{max(1, queue_size // max(global_batch, 1)) * max(global_batch, 1)}")


class DualQueue(nn.Module):
    """Global and hypercolumn queues of ``size`` L2-normalised ``dim``-vectors, with labels/indices.

    Buffers (saved in checkpoints, so a resumed run continues with the same memory bank):
    ``global_keys`` ``[K, dim]``, ``hyper_keys`` ``[K, dim]`` (absent without the hypercolumn
    branch), ``labels`` ``[K]`` and ``indices`` ``[K]`` (-1 = slot still holds its random init),
    ``ptr`` ``[1]`` = next slot to overwrite. Initialised with random unit vectors, as MoCo.
    """

    def __init__(self, size: int, dim: int, hyper: bool = True):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise CghError(f"queue size and dim must be positive (got {size}, {dim})")
        self.size = size
        self.register_buffer("global_keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("hyper_keys", F.normalize(torch.randn(size, dim), dim=1) if hyper else None)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor | None]:
        """Copies of the current contents (the loss must read the queue before this batch enters
        it, and autograd must not see the in-place update that follows)."""
        return {"queue_global": self.global_keys.clone(),
                "queue_hyper": None if self.hyper_keys is None else self.hyper_keys.clone(),
                "queue_labels": self.labels.clone(),
                "queue_indices": self.indices.clone()}

    @torch.no_grad()
    def enqueue(self, global_keys: torch.Tensor, hyper_keys: torch.Tensor | None,
                labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Write this step's teacher keys (``[B, dim]`` per process, gathered from all processes)
        at ``ptr``, overwriting the oldest entries, and advance ``ptr`` modulo K.

        The pointer stays on the device and slots are computed as ``(ptr + arange(B)) % K``, so
        there is no host-device synchronisation.
        """
        validate_queue(self.size, global_keys.shape[0] * world_size())
        if (hyper_keys is None) != (self.hyper_keys is None):
            raise CghError("hypercolumn keys must be given exactly when the queue has a hypercolumn bank")
        global_keys = concat_all_gather(global_keys)
        slots = (self.ptr + torch.arange(global_keys.shape[0], device=self.ptr.device)) % self.size
        self.global_keys.index_copy_(0, slots, global_keys.to(self.global_keys.dtype))
        if hyper_keys is not None:
            self.hyper_keys.index_copy_(0, slots, concat_all_gather(hyper_keys).to(self.hyper_keys.dtype))
        self.labels.index_copy_(0, slots, concat_all_gather(labels.long()))
        self.indices.index_copy_(0, slots, concat_all_gather(indices.long()))
        self.ptr.copy_((self.ptr + global_keys.shape[0]) % self.size)
