"""Pretraining logs: ``metrics.csv`` (one row per epoch), TensorBoard scalars, a tqdm progress bar.

The per-epoch history lives in memory and in every checkpoint; ``metrics.csv`` is rewritten from
it atomically at each epoch end, so a resumed run never holds rows from epochs it replays.
TensorBoard drops events past the resume step (``purge_step``) for the same reason. Only rank 0
writes anything.
"""
from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path

from cgh.io import atomic_write_text


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows as CSV with the union of their keys as header (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


class TrainingLogger:
    """Writes the history to ``metrics.csv`` and scalars to ``tb/``; no-op when ``enabled`` is False."""

    def __init__(self, output_dir: str | Path, enabled: bool, history: list[dict] | None = None,
                 purge_step: int | None = None, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.history: list[dict] = list(history or [])
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tb"), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train/") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(float(v)):
                self.writer.add_scalar(prefix + k, float(v), step)

    def end_epoch(self, row: dict, step: int) -> None:
        """Append one epoch's row to the history, rewrite ``metrics.csv``, log it to TensorBoard."""
        self.history.append(dict(row))
        if not self.enabled:
            return
        write_csv(self.output_dir / "metrics.csv", self.history)
        self.scalars(step, {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))},
                     prefix="epoch/")
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LoaderWait:
    """Iterates over ``loader`` and adds up the host time spent waiting for each next batch
    (``seconds``). The step itself never makes the host wait for the device (no sync), so a large
    share of an epoch spent here means the input pipeline, not the GPU, sets the pace: logged as
    ``data_wait`` (raise ``data.num_workers``, or see BENCHMARKS.md on the loader)."""

    def __init__(self, loader):
        self.loader = loader
        self.seconds = 0.0

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            yield batch


def progress_bar(total: int, epoch: int, epochs: int, enabled: bool):
    """A tqdm bar over one epoch's steps (rank 0, when enabled); otherwise a stand-in that does nothing."""
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr, dynamic_ncols=True,
                    leave=False, mininterval=1.0)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
