"""A run SIGKILLed after a checkpoint and resumed with ``--resume auto`` ends bitwise identical to an
uninterrupted run (CPU, same thread count): weights, teacher, queues, optimizer, logged history."""
from __future__ import annotations

from _helpers_trainer import check_sigkill_resume_is_bitwise_identical


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    check_sigkill_resume_is_bitwise_identical(tmp_path)
