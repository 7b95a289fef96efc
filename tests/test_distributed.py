"""Two gloo processes with half the batch each == one process with the whole batch.

Same loss, same gradients, same parameters after the update and identical queues, over two
steps (the second reads the queue the first one filled and uses the optimizer's momentum).
Shuffle-BN is off for this check (``teacher_bn=plain``) and ``sync_bn=true`` makes every
BatchNorm use the global batch's statistics, as one process would; otherwise per-process BN
statistics legitimately differ from whole-batch ones.

Also here: shuffle-BN's permutation across processes, the compiled model under DDP, and the real
``cgh pretrain`` under ``torchrun`` on two nodes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BATCH, STEPS, SIZE = 16, 2, 64
OVERRIDES = ["output_dir=unused", "data.root=unused", "model.arch=resnet18", "model.dim=32",
             "model.hidden_dim=64", "model.queue_size=32", "model.teacher_bn=plain", "model.sync_bn=true",
             "model.layers=[layer2,layer4]", f"optim.batch_size={BATCH}", "optim.warmup_epochs=1",
             "loss.warmup_epochs=1", "run.precision=fp32", "run.device=cpu", "optim.base_lr=1.0",
             "optim.warmup_start=one_step"]   # step 0 at lr > 0: every step moves the weights


def _inputs():
    g = torch.Generator().manual_seed(123)
    student = torch.randn(STEPS, BATCH, 3, SIZE, SIZE, generator=g)
    teacher = torch.randn(STEPS, BATCH, 3, SIZE, SIZE, generator=g)
    labels = torch.randint(0, 3, (STEPS, BATCH), generator=g)
    return student, teacher, labels


def _run(rank: int, world: int, port: int, out: str, extra: tuple[str, ...] = (), compiled: bool = False,
         dtype: torch.dtype = torch.float32) -> None:
    from cgh.train import build_model, load_pretrain_config, setup_determinism, train_step, wrap_ddp

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_pretrain_config(None, OVERRIDES + list(extra))
    device = torch.device("cpu")
    setup_determinism(cfg, 0)
    core = build_model(cfg, world, device).to(dtype)
    model = wrap_ddp(core, world, device)
    if compiled:   # as the trainer does with run.compile=true: the model and the loss terms
        cfg.run.compile = True
        core.compile(mode=cfg.run.compile_mode)
    opt = torch.optim.SGD(core.parameters(), lr=0.0, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    student, teacher, labels = _inputs()
    student, teacher = student.to(dtype), teacher.to(dtype)
    per = BATCH // world
    sl = slice(rank * per, (rank + 1) * per)
    losses = []
    for step in range(STEPS):
        batch = (([student[step, sl]], teacher[step, sl]), labels[step, sl],
                 torch.arange(BATCH)[sl] + step * BATCH)
        # steps_per_epoch=4: step 0..1 lie inside the InfoNCE warm-up, so every loss term is active
        loss, _ = train_step(model, core, batch, opt, scaler, cfg, step, 8, 4, device, peak_lr=0.05)
        total = loss["total"].detach().clone()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(total)
        if step == 0:
            grads = {n: p.grad.clone() for n, p in core.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"losses": torch.stack(losses), "grads": grads,
                    "state": {k: v.clone() for k, v in core.state_dict().items()}}, out)
    if world > 1:
        dist.destroy_process_group()


def _largest_relative_grad_difference(a: dict, b: dict) -> float:
    """Over the first step's gradients of two ``_run`` results: max |a - b| / max |a|, worst tensor."""
    return max(((a["grads"][n] - b["grads"][n]).abs().max() / a["grads"][n].abs().max().clamp_min(1e-12)).item()
               for n in a["grads"])


def _assert_same_queues(a: dict, b: dict, atol: float) -> None:
    """Queue keys to ``atol``; labels, indices and pointer exactly (same slot = same image)."""
    for k in ("queue.global_keys", "queue.hyper_keys"):
        assert torch.allclose(a["state"][k], b["state"][k], atol=atol), k
    for k in ("queue.labels", "queue.indices", "queue.ptr"):
        assert torch.equal(a["state"][k], b["state"][k]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    single, double = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    threads = torch.get_num_threads()
    try:
        _run(0, 1, 0, single)          # in this process: _run sets one thread, restored below
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_run, args=(2, _free_port(), double), nprocs=2, join=True)
    a = torch.load(single, weights_only=True)
    b = torch.load(double, weights_only=True)

    assert torch.allclose(a["losses"], b["losses"], rtol=1e-5, atol=1e-6), (a["losses"], b["losses"])
    assert set(a["grads"]) == set(b["grads"]) and len(a["grads"]) > 50
    # gradients of the first step (DDP-averaged) agree to float rounding (measured: 2e-5 relative).
    # (16 images of 64 px: with 8 images of 32 px, layer4 is 1x1 and its synchronised BN statistics
    # over 8 values amplified reduction-order rounding into ~1e-3 parameter differences.)
    # After the first update the parameters differ by ~1e-5 (rounding), and in the second step that
    # grew to ~1% in a few backbone gradients (measured), so the second step is compared through its
    # loss, the updated parameters and the queues instead.
    worst = _largest_relative_grad_difference(a, b)
    assert worst < 2e-4, f"largest relative gradient difference {worst}"
    # the hypercolumn head and the backbone's first conv both received (non-zero) gradients
    assert a["grads"]["student_backbone.conv1.weight"].abs().sum() > 0
    assert any("hyper" in n for n in a["grads"])
    # parameters after two SGD steps, teacher included (EMA of those parameters)
    for k, v in a["state"].items():
        if v.is_floating_point() and "queue" not in k:
            assert torch.allclose(v, b["state"][k], rtol=1e-4, atol=1e-5), k
    _assert_same_queues(a, b, atol=1e-5)
    assert a["state"]["queue.indices"].tolist() == list(range(STEPS * BATCH))


def _shuffle_round_trip(rank: int, world: int, port: int, out: str) -> None:
    from cgh.batchnorm import batch_shuffle_ddp, batch_unshuffle_ddp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)   # every process has its own RNG state, as in training
    mine = torch.arange(8.0).view(4, 2) + 8 * rank   # rows 4 rank .. 4 rank + 3 of the global batch
    shuffled, idx = batch_shuffle_ddp(mine)
    torch.save({"mine": mine, "shuffled": shuffled, "back": batch_unshuffle_ddp(shuffled, idx)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_shuffle_bn_permutes_the_global_batch_and_undoes_it(tmp_path):
    """Shuffle-BN under two gloo processes with different RNG states: the processes' shuffled
    slices together hold every sample of the global batch once (one permutation, rank 0's, shared
    by broadcast), samples do cross processes, and unshuffling gives each process its own rows."""
    out = str(tmp_path / "shuffle")
    mp.spawn(_shuffle_round_trip, args=(2, _free_port(), out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    ids = torch.cat([p["shuffled"][:, 0] for p in parts]) / 2
    assert sorted(ids.tolist()) == list(range(8))
    assert any(not set(p["shuffled"][:, 0].tolist()) <= set(p["mine"][:, 0].tolist()) for p in parts)
    for p in parts:
        assert torch.equal(p["back"], p["mine"])


def test_compiled_ddp_with_shuffle_bn_matches_eager(tmp_path):
    """``run.compile`` under DDP with shuffle-BN (the teacher's batch gathered, permuted by rank 0's
    draw outside the graph, and scattered back): two gloo processes compiled by inductor compute
    the eager processes' losses, first-step gradients and queues. In float64, as in
    test_compile.py: in float32 rounding alone moves these tiny nets' gradients by a few %."""
    extra = ("model.teacher_bn=shuffle", "model.sync_bn=false")
    eager, compiled = str(tmp_path / "eager.pt"), str(tmp_path / "compiled.pt")
    mp.spawn(_run, args=(2, _free_port(), eager, extra, False, torch.float64), nprocs=2, join=True)
    mp.spawn(_run, args=(2, _free_port(), compiled, extra, True, torch.float64), nprocs=2, join=True)
    a = torch.load(eager, weights_only=True)
    b = torch.load(compiled, weights_only=True)

    assert torch.allclose(a["losses"], b["losses"], rtol=1e-5), (a["losses"], b["losses"])
    assert set(a["grads"]) == set(b["grads"]) and len(a["grads"]) > 50
    worst = _largest_relative_grad_difference(a, b)
    assert worst < 1e-4, f"largest relative gradient difference {worst}"
    _assert_same_queues(a, b, atol=1e-4)


# ---- the real command under torchrun: 2 nodes x 1 process == 1 node x 2 processes ---------------------

def _torchrun(root, out, port: int, nnodes: int, node_rank: int, *extra: str) -> list[str]:
    from _helpers_trainer import RESUME_EPOCHS, tiny_overrides

    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc_per_node={2 // nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
            f"--master_port={port}", "--max_restarts=0", "-m", "cgh.cli", "pretrain",
            "--config", "pretrain/demo_synth", *tiny_overrides(root, out), f"optim.epochs={RESUME_EPOCHS}",
            "monitor.knn_every=2", "run.deterministic=true", *extra]


def _launch_nodes(root, out, *extra: str) -> list[subprocess.Popen]:
    """Two torchrun agents on this machine standing in for two nodes (static rendezvous at node 0's
    address, as on a cluster), sharing ``out`` as nodes share a file system."""
    from _helpers_trainer import _env

    port = _free_port()
    return [subprocess.Popen(_torchrun(root, out, port, 2, r, *extra), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in (0, 1)]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts its workers in new sessions."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                    # the process ended while being read
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_node(p: subprocess.Popen) -> None:
    """A node dies: its torchrun agent and its worker (which torchrun starts in a new session)."""
    for pid in [p.pid, *_descendants(p.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.communicate()


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill_node(p)
        raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


def test_two_nodes_sigkilled_and_resumed_match_one_node(tmp_path):
    """The multi-node path end to end on CPU: ``cgh pretrain`` under ``torchrun --nnodes 2``
    (gloo, one process per node), both nodes SIGKILLed after the epoch-2 checkpoint and resumed
    with ``--resume auto``, ends bitwise identical to one uninterrupted node with two processes:
    global ranks, not local ones, shard the data and seed the RNGs, and every rank's state resumes."""
    from _helpers_trainer import RESUME_EPOCHS, _env, metric_rows, tiny_synth
    from safetensors.torch import load_file

    root = tiny_synth(tmp_path / "synth")
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    res = subprocess.run(_torchrun(root, one, _free_port(), 1, 0), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    nodes = _launch_nodes(root, two)
    marker = two / "checkpoints" / "epoch_0002.pt"
    deadline = time.time() + 240
    while not marker.exists() and all(p.poll() is None for p in nodes) and time.time() < deadline:
        time.sleep(0.02)
    for p in nodes:
        _kill_node(p)
    assert marker.exists(), "the two-node run never wrote its epoch-2 checkpoint"
    assert (two / "checkpoints" / "epoch_0002.rank1.pt").exists(), "rank 1 (on node 1) saved no RNG state"
    assert not (two / "backbone.safetensors").exists(), "the run finished before it was killed"

    logs = _wait(_launch_nodes(root, two, "--resume", "auto"))
    assert "resumed from" in logs[0] and f"/{RESUME_EPOCHS})" in logs[0]

    a, b = load_file(str(one / "backbone.safetensors")), load_file(str(two / "backbone.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(one / "checkpoints" / f"epoch_{RESUME_EPOCHS:04d}.pt", weights_only=True)
    sb = torch.load(two / "checkpoints" / f"epoch_{RESUME_EPOCHS:04d}.pt", weights_only=True)
    assert sa["world_size"] == sb["world_size"] == 2
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert metric_rows(one) == metric_rows(two) and len(metric_rows(one)) == RESUME_EPOCHS
    record = json.loads((two / "result.json").read_text())
    assert record["extra"]["world_size"] == 2
