"""``benchmarks/pretrain_step.py --profile`` charges each kernel of a Chrome trace to the right
phase of ``train_step`` (hand-made traces with known answers)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_step.py"


@pytest.fixture(scope="module")
def summarise():
    spec = importlib.util.spec_from_file_location("pretrain_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.summarise_trace


def _event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_gpu_kernels_are_charged_to_the_range_their_start_lies_in(summarise):
    events = []
    for start in (0, 10_000):   # two steps, 10 ms apart (times in microseconds)
        events += [_event("gpu_user_annotation", "cgh.forward", start, 3000),
                   _event("gpu_user_annotation", "cgh.loss", start + 3000, 1000),
                   _event("cpu_op", "aten::conv", start, 50),                 # CPU side: not a kernel
                   _event("kernel", "conv_fprop", start + 100, 2000),
                   _event("kernel", "softmax", start + 2900, 400),             # starts in forward, ends in loss
                   _event("kernel", "gemm_f32", start + 3500, 300),
                   _event("gpu_memset", "Memset", start + 3900, 10),
                   _event("kernel", "conv_dgrad", start + 5000, 3000),        # autograd's thread: no range
                   _event("kernel", "conv_fprop", start + 8000, 1000)]
    lines = summarise({"traceEvents": events + [{"ph": "M", "name": "process_name"}]}, steps=2).splitlines()
    assert lines[0] == "6.7 ms of kernel time per step (6 kernels)"
    assert lines[1].split() == ["phase", "no", "range", "(backward)", "4.00", "ms", "per", "step"]
    assert lines[2].split() == ["phase", "cgh.forward", "2.40", "ms", "per", "step"]
    assert lines[3].split() == ["phase", "cgh.loss", "0.31", "ms", "per", "step"]
    assert lines[4].split() == ["3.00", "ms", "2x", "conv_fprop"]
    assert lines[5].split() == ["3.00", "ms", "1x", "conv_dgrad"]
    assert [line.split()[-1] for line in lines[6:]] == ["softmax", "gemm_f32", "Memset"]


def test_cpu_trace_reports_the_wall_time_of_each_range(summarise):
    events = [_event("user_annotation", "cgh.forward", 0, 5000), _event("user_annotation", "cgh.backward", 5000, 9000),
              _event("user_annotation", "cgh.forward", 20_000, 7000), _event("cpu_op", "aten::mm", 100, 400)]
    lines = summarise({"traceEvents": events}, steps=2, rows=5).splitlines()
    assert lines[0].startswith("wall time per step of each range")
    assert lines[1].split() == ["phase", "cgh.forward", "6.00", "ms", "per", "step"]
    assert lines[2].split() == ["phase", "cgh.backward", "4.50", "ms", "per", "step"]
    assert len(lines) == 3
