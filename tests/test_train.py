"""Pretraining engine: outputs of a run, bad input, NaN stop, corrupt images, learning signal."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from _helpers_trainer import tiny_overrides, tiny_synth
from cgh.checkpointing import load_checkpoint
from cgh.cli import main as cli_main
from cgh.errors import CghError, DatasetError
from cgh.io import sha256_file
from cgh.train import load_pretrain_config, pretrain


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("synth"))


def _cfg(root, out, *extra):
    return load_pretrain_config("pretrain/demo_synth", tiny_overrides(root, out) + list(extra))


# ------------------------------------------------------------------------------- bad config
def test_queue_not_divisible_by_global_batch(tmp_path, synth):
    with pytest.raises(CghError, match=r"queue_size \(40\).*global batch size \(16"):
        pretrain(_cfg(synth, tmp_path / "o", "model.queue_size=40"))
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_unknown_layer_name(tmp_path, synth):
    with pytest.raises(CghError, match=r"'layer5'.*valid names: layer1, layer2, layer3, layer4"):
        pretrain(_cfg(synth, tmp_path / "o", "model.layers=[layer3,layer5]"))


def test_unknown_compile_mode(tmp_path, synth):
    with pytest.raises(CghError, match=r"run.compile_mode 'fast' unknown.*default, reduce-overhead"):
        pretrain(_cfg(synth, tmp_path / "o", "run.compile=true", "run.compile_mode=fast"))
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_run_tf32_sets_cuda_matmul_precision(tmp_path, synth):
    """``run.tf32`` (default on) is what a run sets for CUDA float32 matmuls, the loss's
    similarity products under autocast; ``run.tf32=false`` keeps them full float32."""
    assert load_pretrain_config(None, ["output_dir=o", "data.root=r"]).run.tf32 is True
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        pretrain(_cfg(synth, tmp_path / "off", "run.tf32=false", "optim.epochs=1", "monitor.knn_every=0"))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        pretrain(_cfg(synth, tmp_path / "on", "optim.epochs=1", "monitor.knn_every=0"))
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_num_workers_minus_one_shares_this_process_cpus(tmp_path, synth, monkeypatch):
    """``num_workers: -1`` (ImageNet config, eval protocols): $CGH_NUM_WORKERS if set, else this
    process's share of its CPUs less one for the main process, at most 32."""
    from eval.features import resolve_num_workers

    monkeypatch.delenv("CGH_NUM_WORKERS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_num_workers(-1) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")    # torchrun, 8 processes on this node
    assert resolve_num_workers(-1) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(512)))
    assert resolve_num_workers(-1) == 32 and resolve_num_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert resolve_num_workers(-1) == 0
    monkeypatch.setenv("CGH_NUM_WORKERS", "5")
    assert resolve_num_workers(-1) == 5
    with pytest.raises(CghError, match=r"num_workers must be >= 0, or -1.*got -2"):
        pretrain(_cfg(synth, tmp_path / "o", "data.num_workers=-2"))
    assert not (tmp_path / "o" / "checkpoints").exists()


# ------------------------------------------------------------------------------- corrupt images
def _corrupt_copy(synth, dst):
    """A copy of the tiny set whose first training image (class folder order) is truncated."""
    shutil.copytree(synth, dst)
    first_class = sorted((dst / "classification" / "train").iterdir())[0]
    victim = sorted(first_class.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])
    return dst, victim


@pytest.mark.parametrize("tensor_images", [False, True])   # PIL images, or uint8 tensors (GPU path)
def test_corrupt_image_skipped_and_counted_or_fatal(tmp_path, synth, tensor_images):
    from cgh.data.datasets import build_classification_dataset
    from cgh.data.pretrain_dataset import PretrainDataset

    def size(img):
        return tuple(img.shape[:0:-1]) if tensor_images else img.size

    root, victim = _corrupt_copy(synth, tmp_path / "bad")
    base = build_classification_dataset("synthshapes", root, "train", None)
    assert base.samples[0][0] == str(victim)
    ds = PretrainDataset(base, transform=size, tensor_images=tensor_images)
    got_size, label, index, skipped = ds[0]
    # replaced deterministically by the next image (same batch size), and counted
    assert (index, skipped, label) == (1, 1, base.samples[1][1]) and got_size == (32, 32)
    assert ds[0] == ds[0] and ds[2][2:] == (2, 0)
    strict = PretrainDataset(base, transform=size, strict_images=True, tensor_images=tensor_images)
    with pytest.raises(DatasetError, match=victim.name):
        strict[0]


# ------------------------------------------------------------------------------- a run, then NaN
def test_run_outputs_then_nan_stops_and_keeps_last_checkpoint(tmp_path, synth, capsys):
    root, victim = _corrupt_copy(synth, tmp_path / "bad")
    out = tmp_path / "run"
    path = pretrain(_cfg(root, out, "optim.epochs=1"))

    # the outputs other parts read
    assert path == out / "backbone.safetensors" and path.is_file()
    side = json.loads((out / "backbone.json").read_text())
    assert side["method"] == "cgh" and side["arch"] == "resnet18" and side["epoch"] == 1
    assert side["train_config"]["loss_mode"] == "cross" and side["train_config"]["layers"] == ["layer3", "layer4"]
    ckpt = out / "checkpoints" / "epoch_0001.pt"
    assert side["source_sha256"] == sha256_file(ckpt)
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    rec = json.loads((out / "result.json").read_text())
    assert rec["protocol"] == "pretrain" and rec["checkpoint"]["sha256"] == side["sha256"]
    assert rec["checkpoint"]["train"]["tau_h"] == 0.08
    hist = rec["extra"]["history"]
    assert len(hist) == 1 and {"loss", "gh", "hg", "infonce", "lr", "momentum", "knn_top1", "pos_precision",
                               "pos_recall"} <= set(hist[0])
    assert rec["metrics"]["knn_top1"] == hist[0]["knn_top1"] and 0 <= rec["metrics"]["knn_top1"] <= 100
    assert set(rec["extra"]["positive_selection"]) == {"0.05"}
    # the collapse check: RankMe of each queue at the end of the epoch, as saved in the checkpoint
    queues = load_checkpoint(ckpt, 0)["model"]
    for branch in ("global", "hyper"):
        s = np.linalg.svd(queues[f"queue.{branch}_keys"].double().numpy(), compute_uv=False)
        p = s / s.sum()
        assert hist[0][f"queue_rank_{branch}"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
    # the truncated file was passed over once per epoch and counted
    assert rec["extra"]["skipped_images"] == 1 and hist[0]["skipped_images"] == 1
    # num_workers=0: the main process decodes and augments every batch, so it waits for data part of the time
    assert 0 < hist[0]["data_wait"] < 1
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss", "gh", "hg", "lr", "knn_top1", "pos_recall", "skipped_images", "queue_rank_global",
            "queue_rank_hyper"} <= set(header)

    # continue from that checkpoint for more epochs with an absurd learning rate (other settings, so
    # in a folder of their own): the loss turns NaN, training stops with a clear message (through
    # the CLI: one line, exit status 2) and the last good checkpoint stays
    before = sha256_file(ckpt)
    nan_out = tmp_path / "run_nan"
    argv = ["pretrain", "--config", "pretrain/demo_synth", "--resume", str(ckpt),
            *tiny_overrides(root, nan_out), "optim.epochs=3", "optim.base_lr=1e30", "optim.warmup_epochs=0"]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "epoch 2" in err and "epoch_0001.pt" in err and "is kept" in err
    assert sha256_file(ckpt) == before
    assert [p.name for p in sorted((out / "checkpoints").glob("*.pt"))] == ["epoch_0001.pt"]
    assert not list(nan_out.glob("checkpoints/*.pt"))      # nothing saved from the diverged epochs


def test_strict_images_is_fatal_in_a_run(tmp_path, synth):
    root, victim = _corrupt_copy(synth, tmp_path / "bad")
    with pytest.raises(DatasetError, match="strict_images"):
        pretrain(_cfg(root, tmp_path / "o", "data.strict_images=true", "optim.epochs=1",
                      "monitor.knn_every=0"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("teacher_bn", ["split", "plain"])
def test_train_step_has_no_host_sync_on_cuda(teacher_bn):
    """The whole step (GPU augmentation, teacher EMA + forward, student, loss, queues, SGD) runs
    with CUDA's sync-debug mode set to "error": any host-device synchronisation raises."""
    from cgh.train import build_gpu_augment, build_model, param_groups, train_step
    from cgh.transforms import PhotometricParams, blur_sigma

    device = torch.device("cuda")
    cfg = load_pretrain_config(None, ["output_dir=unused", "data.root=unused", "model.arch=resnet18",
                                      "model.queue_size=256", "optim.batch_size=32", "data.image_size=32",
                                      f"model.teacher_bn={teacher_bn}", "model.bn_splits=4",
                                      "model.hidden_dim=64", "model.dim=32"])
    model = build_model(cfg, 1, device)
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    augment = build_gpu_augment(cfg.data, device)
    b, s = 32, 32
    draw = PhotometricParams(blur_sigma(s))
    params = torch.stack([draw() for _ in range(b)])
    images = [torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8) for _ in range(2)]
    batch = (([(images[0].pin_memory(), params.pin_memory())], images[1].pin_memory()),   # as the loader pins
             torch.randint(0, 10, (b,)).pin_memory(), torch.arange(b).pin_memory())
    for step in range(2):   # lazy initialisation and cuDNN autotuning may synchronise
        train_step(model, model, batch, opt, scaler, cfg, step, 100, 10, device, 0.05, augment)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 4):
            loss, _ = train_step(model, model, batch, opt, scaler, cfg, step, 100, 10, device, 0.05, augment)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss["total"]).item()


def test_loader_wait_counts_only_the_time_spent_fetching_batches():
    """``data_wait``'s clock: sleeps inside the loader are counted, the consumer's are not."""
    import time

    from cgh.logging import LoaderWait

    class SlowLoader:
        def __iter__(self):
            for i in range(4):
                time.sleep(0.03)
                yield i

    waiting = LoaderWait(SlowLoader())
    start, seen = time.perf_counter(), []
    for batch in waiting:
        seen.append(batch)
        time.sleep(0.05)   # the "step"
    elapsed = time.perf_counter() - start
    assert seen == [0, 1, 2, 3]
    assert 4 * 0.03 <= waiting.seconds <= elapsed - 4 * 0.05
