"""Per-iteration schedules of the pretraining loop, as pure functions of the step.

Being functions of ``step`` alone (no scheduler object with hidden state), a resumed run lands on
exactly the value an uninterrupted run would have used.
"""
from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule used by the authors: ``lr = base_lr * batch / 256``."""
    return base_lr * global_batch / 256


WARMUP_STARTS = ("zero", "one_step")


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float,
                     final_lr: float = 0.0, start: str = "zero") -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay to ``final_lr``.

    ``start`` (``optim.warmup_start``) says where the warm-up's line starts:
    - ``"zero"`` (the CGH authors' and ReSSL's ``adjust_learning_rate``): step ``i`` uses
      ``peak_lr * i / warmup_steps``, so the first step runs at lr 0;
    - ``"one_step"``: ``peak_lr * (i + 1) / warmup_steps``, so the first update is not spent at lr 0.
    The cosine part (the same for both) is ``final_lr + (peak_lr - final_lr) (1 + cos(pi t)) / 2``
    with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``, reaching ``final_lr`` at
    ``total_steps``.
    """
    if start not in WARMUP_STARTS:
        raise ValueError(f"unknown warm-up start '{start}' ({' or '.join(WARMUP_STARTS)})")
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + (start == "one_step")) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def teacher_momentum(step: int, total_steps: int, base_momentum: float, schedule: str = "constant") -> float:
    """EMA momentum of the teacher: constant (authors' code, 0.999) or cosine-increased to 1 (BYOL)."""
    if schedule == "constant":
        return base_momentum
    if schedule == "cosine":
        progress = min(1.0, step / max(1, total_steps))
        return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0
    raise ValueError(f"unknown momentum schedule '{schedule}' (constant or cosine)")
