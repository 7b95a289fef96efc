"""Two gloo processes with half the batch each == one process with the whole batch.

Same loss, same gradients, same parameters after the update and identical queues, over two
steps (the second reads the queue the first one filled and uses the optimizer's momentum).
Shuffle-BN is off for this check (``teacher_bn=plain``) and ``sync_bn=true`` makes every
BatchNorm use the global batch's statistics, as one process would; otherwise per-process BN
statistics legitimately differ from whole-batch ones.
"""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BATCH, STEPS, SIZE = 16, 2, 64
OVERRIDES = ["output_dir=unused", "data.root=unused", "model.arch=resnet18", "model.dim=32",
             "model.hidden_dim=64", "model.queue_size=32", "model.teacher_bn=plain", "model.sync_bn=true",
             "model.layers=[layer2,layer4]", f"optim.batch_size={BATCH}", "optim.warmup_epochs=1",
             "loss.warmup_epochs=1", "run.precision=fp32", "run.device=cpu", "optim.base_lr=1.0"]


def _inputs():
    g = torch.Generator().manual_seed(123)
    student = torch.randn(STEPS, BATCH, 3, SIZE, SIZE, generator=g)
    teacher = torch.randn(STEPS, BATCH, 3, SIZE, SIZE, generator=g)
    labels = torch.randint(0, 3, (STEPS, BATCH), generator=g)
    return student, teacher, labels


def _run(rank: int, world: int, port: int, out: str) -> None:
    from cgh.train import build_model, load_pretrain_config, setup_determinism, train_step, wrap_ddp

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_pretrain_config(None, OVERRIDES)
    device = torch.device("cpu")
    setup_determinism(cfg, 0)
    core = build_model(cfg, world, device)
    model = wrap_ddp(core, world, device)
    opt = torch.optim.SGD(core.parameters(), lr=0.0, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    student, teacher, labels = _inputs()
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
    worst = max(((a["grads"][n] - b["grads"][n]).abs().max() / a["grads"][n].abs().max().clamp_min(1e-12)).item()
                for n in a["grads"])
    assert worst < 2e-4, f"largest relative gradient difference {worst}"
    # the hypercolumn head and the backbone's first conv both received (non-zero) gradients
    assert a["grads"]["student_backbone.conv1.weight"].abs().sum() > 0
    assert any("hyper" in n for n in a["grads"])
    # parameters after two SGD steps, teacher included (EMA of those parameters)
    for k, v in a["state"].items():
        if v.is_floating_point() and "queue" not in k:
            assert torch.allclose(v, b["state"][k], rtol=1e-4, atol=1e-5), k
    # queues: keys to float tolerance, labels/indices/pointer exactly (same slot = same image)
    for k in ("queue.global_keys", "queue.hyper_keys"):
        assert torch.allclose(a["state"][k], b["state"][k], atol=1e-5), k
    for k in ("queue.labels", "queue.indices", "queue.ptr"):
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["state"]["queue.indices"].tolist() == list(range(STEPS * BATCH))
