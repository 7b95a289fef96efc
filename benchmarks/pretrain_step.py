"""Cost of a CGH training step against a plain supervised step, and the two-view loader's speed.

Both steps use the same backbone, batch, resolution, precision (bf16 autocast + channels_last on
GPU) and SGD; inputs are pre-made tensors on the device so only the step is timed. The CGH step is
``cgh.train.train_step`` itself (teacher EMA, teacher forward, student forward/backward of both
branches, queues, loss). The loader benchmark runs the real two-view augmentation through a
DataLoader and reports images/s, to compare with the step's images/s: once with the full CPU
augmentation, once with the GPU path's CPU part (crop + flip, parameters drawn); the GPU path's
device part (``cgh.gpu_augment`` on one collated batch) is timed on the device.

    python benchmarks/pretrain_step.py                       # CPU, small settings
    python benchmarks/pretrain_step.py --device cuda --arch resnet50 --batch-size 256 \
        --image-size 224 --queue-size 131072 --workers 16    # the GPU target (H100: CGH <= 1.5x)
    python benchmarks/pretrain_step.py --data-root /data/imagenet --dataset imagenet --workers 16
    python benchmarks/pretrain_step.py --device cuda --skip-loader --compile --profile   # where the time goes
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _back_to_back_time(fn, steps: int, device: torch.device, window: int = 10) -> float:
    """Median over windows of ``window`` consecutive steps of the mean step time, with one sync
    per window: how the training loop runs (it never waits for the GPU), so host work that
    overlaps the previous step's kernels is not counted, unlike ``_median_time``'s per-step sync.
    Run after ``_median_time``, whose steps warmed ``fn`` up."""
    times = []
    for _ in range(max(1, steps // window)):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(window):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / window)
    return statistics.median(times)


def _median_issue_time(fn, steps: int, device: torch.device) -> float:
    """Median host time to *enqueue* one step (GPU idle at the start, no sync at the end): when it
    is close to the step time, the step is bound by kernel launches, not by the GPU."""
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    _sync(device)
    return statistics.median(times)


def summarise_trace(trace: dict, steps: int, rows: int = 20) -> str:
    """Per-step time by phase and the busiest kernels from a ``torch.profiler`` Chrome trace.

    GPU (the trace has kernels): each kernel is charged to the ``cgh.*`` range (``train_step``'s
    phases) or optimizer range whose device-side span contains its start; kernels in none are the
    backward pass, which autograd launches from its own thread, outside the step's ranges. CPU: the
    wall time of each range (the CPU backward runs inside ``cgh.backward``)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    phases: dict[str, float] = {}
    lines = []
    if kernels:
        spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                       if e.get("cat") == "gpu_user_annotation")
        by_kernel: dict[str, list[float]] = {}
        for k in kernels:
            phase = next((name for start, end, name in spans if start <= k["ts"] < end), "no range (backward)")
            phases[phase] = phases.get(phase, 0.0) + k["dur"]
            by_kernel.setdefault(k["name"], []).append(k["dur"])
        busy = sum(k["dur"] for k in kernels)
        lines.append(f"{busy / steps / 1000:.1f} ms of kernel time per step ({len(kernels) // steps} kernels)")
    else:
        for e in events:
            if e.get("cat") == "user_annotation":
                phases[e["name"]] = phases.get(e["name"], 0.0) + e["dur"]
        by_kernel = {}
        lines.append("wall time per step of each range (no kernels in the trace)")
    for name, total in sorted(phases.items(), key=lambda item: -item[1]):
        lines.append(f"  phase {name:<24} {total / steps / 1000:8.2f} ms per step")
    for name, durations in sorted(by_kernel.items(), key=lambda item: -sum(item[1]))[:rows]:
        lines.append(f"  {sum(durations) / steps / 1000:8.2f} ms {len(durations) // steps:5d}x  {name[:100]}")
    return "\n".join(lines)


def profile_summary(fn, device: torch.device, steps: int = 3, rows: int = 20, trace: str = "") -> str:
    """Profile ``steps`` steps of ``fn`` (after one untimed) and summarise them
    (``summarise_trace``); ``trace``: also keep the Chrome trace there."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = trace or str(Path(tmp) / "trace.json")
        prof.export_chrome_trace(path)
        data = json.loads(Path(path).read_text())
    return f"profile over {steps} steps: " + summarise_trace(data, steps, rows)


def cgh_step_fn(args, device):
    from cgh.train import build_model, load_pretrain_config, param_groups, setup_tf32, train_step

    overrides = ["output_dir=unused", "data.root=unused", f"model.arch={args.arch}",
                 f"model.queue_size={args.queue_size}", f"optim.batch_size={args.batch_size}",
                 f"run.precision={args.precision}", f"model.teacher_bn={args.teacher_bn}",
                 f"loss.mode={args.loss_mode}", f"model.hidden_dim={args.hidden_dim}",
                 f"run.compile={str(args.compile).lower()}", f"run.compile_mode={args.compile_mode}"]
    cfg = load_pretrain_config(None, overrides + list(args.override))
    setup_tf32(cfg.run)
    model = build_model(cfg, 1, device)
    if args.compile:
        model.compile(mode=args.compile_mode)
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and args.precision == "fp16")
    b, s = args.batch_size, args.image_size
    batch = (([torch.randn(b, 3, s, s, device=device)], torch.randn(b, 3, s, s, device=device)),
             torch.randint(0, 1000, (b,), device=device), torch.arange(b, device=device))
    state = {"step": 10 ** 6}   # past the loss warm-up: the steady-state step

    def step():
        train_step(model, model, batch, opt, scaler, cfg, state["step"], 2 * 10 ** 6, 1000, device, 0.05)
        state["step"] += 1
    return step


def supervised_step_fn(args, device):
    from cgh.backbone import build_backbone, feature_dim
    from cgh.train import autocast

    model = nn.Sequential(build_backbone(args.arch), nn.Linear(feature_dim(args.arch), 1000)).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile(mode=args.compile_mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    b, s = args.batch_size, args.image_size
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last if cuda else
                                                          torch.contiguous_format)
    y = torch.randint(0, 1000, (b,), device=device)

    def step():
        with autocast(device, args.precision):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


class RandomImages(Dataset):
    """Random RGB PIL images of a fixed size (stands in for decoded JPEGs when no root is given)."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        arr = torch.randint(0, 256, (self.size, self.size, 3), generator=g, dtype=torch.uint8).numpy()
        return Image.fromarray(arr), 0


def _data_config(args):
    from cgh.train import DataConfig

    return DataConfig(root="", image_size=args.image_size, multi_crop=args.multi_crop)


def two_view_dataset(args, gpu_augment: bool):
    from cgh.data.pretrain_dataset import PretrainDataset
    from cgh.train import build_transform

    if args.data_root:
        from cgh.data.datasets import build_classification_dataset
        base = build_classification_dataset(args.dataset, args.data_root, "train", None)
    else:
        base = RandomImages(args.batch_size * (args.loader_batches + 2), int(args.image_size * 1.15))
    return PretrainDataset(base, build_transform(_data_config(args), gpu_augment), tensor_images=gpu_augment)


def loader_images_per_s(args, gpu_augment: bool = False) -> float:
    """Images/s of the workers: full CPU augmentation, or the GPU path's CPU part."""
    ds = two_view_dataset(args, gpu_augment)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(args.loader_batches):
        batch = next(it)
        n += batch[1].shape[0]
    return n / (time.perf_counter() - t0)


def gpu_augment_seconds(args, device: torch.device) -> float:
    """Median time of the GPU path's device part for one batch (student view(s) + teacher)."""
    from torch.utils.data import default_collate

    from cgh.train import build_gpu_augment, views_on_device

    ds = two_view_dataset(args, gpu_augment=True)
    students, teacher = default_collate([ds[i][0] for i in range(args.batch_size)])
    students = [(images.to(device), params.to(device)) for images, params in students]   # as they arrive
    teacher = teacher.to(device)
    augment = build_gpu_augment(_data_config(args), device)
    return _median_time(lambda: views_on_device(students, teacher, device, augment), args.steps, args.warmup,
                        device)


def main() -> None:
    from cgh.train import COMPILE_MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default=None, help="default: resnet50 on GPU, resnet18 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on GPU, 64 on CPU")
    p.add_argument("--queue-size", type=int, default=None, help="default: 131072 on GPU, 4096 on CPU")
    p.add_argument("--hidden-dim", type=int, default=4096)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--teacher-bn", default="split", choices=["split", "shuffle", "plain"])
    p.add_argument("--loss-mode", default="cross", choices=["cross", "same", "global"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 GPU, 2 CPU)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 8 GPU, 2 CPU)")
    p.add_argument("--loader-batches", type=int, default=None, help="batches timed in the loader benchmark")
    p.add_argument("--multi-crop", action="store_true")
    p.add_argument("--data-root", default="", help="real dataset for the loader benchmark (else random images)")
    p.add_argument("--dataset", default="imagenet")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (run.compile)")
    p.add_argument("--profile", action="store_true",
                   help="print the CGH step's device time by phase and its busiest kernels (torch.profiler)")
    p.add_argument("--trace", default="", help="with --profile: write the CGH steps' Chrome trace here")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode (run.compile_mode); reduce-overhead = CUDA graphs")
    p.add_argument("override", nargs="*", help="more pretraining config overrides for the CGH step, e.g. run.tf32=false")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.arch = args.arch or ("resnet50" if gpu else "resnet18")
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.image_size = args.image_size or (224 if gpu else 64)
    args.queue_size = args.queue_size or (131072 if gpu else 4096)
    args.steps = args.steps or (30 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.workers = args.workers if args.workers is not None else (8 if gpu else 2)
    args.loader_batches = args.loader_batches or (20 if gpu else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    precision = args.precision if gpu else "fp32 (CPU)"
    print(f"device={device} arch={args.arch} batch={args.batch_size} image={args.image_size}px "
          f"precision={precision} queue={args.queue_size} teacher_bn={args.teacher_bn} loss={args.loss_mode} "
          f"threads={torch.get_num_threads()}" + (f" compile={args.compile_mode}" if args.compile else ""))
    sup_fn, cgh_fn = supervised_step_fn(args, device), cgh_step_fn(args, device)
    sup = _median_time(sup_fn, args.steps, args.warmup, device)
    cgh = _median_time(cgh_fn, args.steps, args.warmup, device)
    sup_issue = _median_issue_time(sup_fn, args.steps, device)
    cgh_issue = _median_issue_time(cgh_fn, args.steps, device)
    sup_run = _back_to_back_time(sup_fn, 3 * args.steps, device)
    cgh_run = _back_to_back_time(cgh_fn, 3 * args.steps, device)
    b = args.batch_size
    print(f"supervised step: {sup * 1000:.1f} ms median ({b / sup:.1f} img/s), "
          f"host issue time {sup_issue * 1000:.1f} ms; back to back {sup_run * 1000:.1f} ms ({b / sup_run:.1f} img/s)")
    print(f"CGH step:        {cgh * 1000:.1f} ms median ({b / cgh:.1f} img/s), "
          f"host issue time {cgh_issue * 1000:.1f} ms; back to back {cgh_run * 1000:.1f} ms ({b / cgh_run:.1f} img/s)")
    print(f"ratio CGH / supervised: {cgh / sup:.2f}x each step synced, {cgh_run / sup_run:.2f}x back to back "
          f"as in training (target on an H100: <= 1.5x)")
    if args.profile:
        print("supervised step, " + profile_summary(sup_fn, device, rows=8))
        print("CGH step, " + profile_summary(cgh_fn, device, trace=args.trace))
    if not args.skip_loader:
        rate = loader_images_per_s(args)
        verdict = "keeps up with" if rate >= b / cgh else "STARVES"
        print(f"two-view loader, CPU augmentation: {rate:.1f} img/s with {args.workers} workers -> {verdict} "
              f"the CGH step")
        aug = gpu_augment_seconds(args, device)
        step = cgh + aug   # the step with the device part of the augmentation in front of it
        rate = loader_images_per_s(args, gpu_augment=True)
        verdict = "keeps up with" if rate >= b / step else "STARVES"
        print(f"two-view loader, GPU augmentation's CPU part: {rate:.1f} img/s with {args.workers} workers -> "
              f"{verdict} the CGH step + device augmentation ({b / step:.1f} img/s)")
        print(f"GPU augmentation's device part on {device}: {aug * 1000:.2f} ms median per batch of {b} at "
              f"{args.image_size} px ({100 * aug / cgh:.1f}% of the CGH step)")


if __name__ == "__main__":
    main()
