"""Run folders are bound to one run and one process: a folder of another checkpoint, protocol or
setting is refused (or moved aside on request), a second process is locked out, killed writes'
temporaries are cleaned, and a full disk is one clear line that leaves the old files intact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cgh.backbone import backbone_state_dict, build_backbone
from cgh.canonical import save_canonical
from cgh.config import load_config, to_dict
from cgh.errors import CghError
from cgh.io import sha256_file
from cgh.protocols import load_protocol_config, run_protocol
from cgh.records import read_record
from cgh.run_folder import RUN_FILE, RunFolderError, claimed_run_folder, run_identity
from cgh.train import PretrainConfig, pretrain
from transfer.cli_transfer import default_output_dir
from _helpers_eval import synth_cls_root  # noqa: F401  (fixture)
from _helpers_trainer import tiny_overrides, tiny_synth

ROOT = Path(__file__).resolve().parent.parent


def _random_ckpt(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_canonical(backbone_state_dict(build_backbone("resnet18")), path, method="random-init")


def _knn(ckpt, root, out, *extra: str) -> list[str]:
    return [f"checkpoint={ckpt}", f"output_dir={out}", "dataset=synthshapes", f"data_root={root}", "resize=32",
            "crop=32", "batch_size=100", "num_workers=0", "device=cpu", "ks=[5]", "cache_dir=", *extra]


def test_identity_ignores_launch_settings_only(tmp_path):
    base = load_protocol_config("knn", None, _knn("/a/x.safetensors", "/data", "/out/a"))
    moved = load_protocol_config("knn", None, _knn("/b/y.safetensors", "/data", "/out/b", "num_workers=3",
                                                   "overwrite=true"))
    other_k = load_protocol_config("knn", None, _knn("/a/x.safetensors", "/data", "/out/a", "ks=[7]"))
    ident = run_identity("knn", "ab" * 32, to_dict(base))
    assert ident == run_identity("knn", "ab" * 32, to_dict(moved))
    assert ident["config_sha256"] != run_identity("knn", "ab" * 32, to_dict(other_k))["config_sha256"]
    assert ident != run_identity("knn", "cd" * 32, to_dict(base))
    assert ident != run_identity("linear", "ab" * 32, to_dict(base))


def test_folder_of_another_checkpoint_is_refused_then_moved_aside(synth_cls_root, tmp_path):
    a, b = _random_ckpt(tmp_path / "a" / "backbone.safetensors", 0), _random_ckpt(tmp_path / "b" / "backbone.safetensors", 1)
    out = tmp_path / "run"
    first = read_record(run_protocol("knn", None, _knn(a, synth_cls_root, out)))
    assert first["checkpoint"]["sha256"] == sha256_file(a)

    with pytest.raises(RunFolderError) as err:
        run_protocol("knn", None, _knn(b, synth_cls_root, out))
    msg = str(err.value)
    assert "\n" not in msg and sha256_file(a)[:12] in msg and sha256_file(b)[:12] in msg
    assert read_record(out / "result.json")["checkpoint"]["sha256"] == sha256_file(a)   # untouched

    second = read_record(run_protocol("knn", None, _knn(b, synth_cls_root, out, "overwrite=true")))
    assert second["checkpoint"]["sha256"] == sha256_file(b)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and read_record(aside[0] / "result.json")["checkpoint"]["sha256"] == sha256_file(a)
    assert json.loads((out / RUN_FILE).read_text())["checkpoint_sha256"] == sha256_file(b)


def test_folder_of_another_protocol_or_setting_keeps_its_record(synth_cls_root, tmp_path):
    ckpt = _random_ckpt(tmp_path / "r.safetensors", 0)
    out = tmp_path / "run"
    run_protocol("knn", None, _knn(ckpt, synth_cls_root, out))
    before = (out / "result.json").read_bytes()
    with pytest.raises(RunFolderError, match="belongs to a knn run"):
        run_protocol("linear", None, [f"checkpoint={ckpt}", f"output_dir={out}", "dataset=synthshapes",
                                      f"data_root={synth_cls_root}", "device=cpu"])
    with pytest.raises(RunFolderError, match="differ in: config"):
        run_protocol("knn", None, _knn(ckpt, synth_cls_root, out, "temperature=0.5"))
    assert (out / "result.json").read_bytes() == before
    # the same run again is welcome (a rerun of the same settings rewrites its own record)
    assert read_record(run_protocol("knn", None, _knn(ckpt, synth_cls_root, out)))["protocol"] == "knn"


def test_unclaimed_folder_with_files_is_refused(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "result.json").write_text("{}")
    with pytest.raises(RunFolderError, match="no cgh run claims"):
        with claimed_run_folder(out, run_identity("knn", "ab" * 32, {})):
            pass


def test_a_second_process_is_locked_out(tmp_path):
    ident = run_identity("knn", "ab" * 32, {"k": 1})
    out = tmp_path / "run"
    with claimed_run_folder(out, ident):
        # another process, started while this one holds the folder
        code = textwrap.dedent(f"""
            from cgh.run_folder import claimed_run_folder, RunFolderError
            try:
                with claimed_run_folder({str(out)!r}, {ident!r}):
                    print("claimed")
            except RunFolderError as e:
                print("refused:", e)
        """)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert res.stdout.startswith("refused:") and "in use by another cgh process" in res.stdout, res.stderr
    with claimed_run_folder(out, ident):      # released at the end of the first claim
        pass


def test_claim_removes_temporaries_of_killed_writes(tmp_path):
    ident = run_identity("pretrain", None, {"a": 1})
    out = tmp_path / "run"
    with claimed_run_folder(out, ident):
        pass
    (out / "checkpoints").mkdir()
    orphans = [out / ".result.json.k2j3.tmp", out / "checkpoints" / ".epoch_0003.pt.x9z.tmp"]
    keep = [out / "checkpoints" / "epoch_0002.pt", out / "notes.tmp"]
    for p in orphans + keep:
        p.write_bytes(b"x" * 100)
    with claimed_run_folder(out, ident):
        pass
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in keep)


def test_transfer_folder_of_another_checkpoint_is_refused_before_anything_runs(tmp_path):
    a, b = _random_ckpt(tmp_path / "a.safetensors", 0), _random_ckpt(tmp_path / "b.safetensors", 1)
    out = tmp_path / "voc"
    overrides = [f"output_dir={out}", f"voc_root={tmp_path / 'no-devkit'}", "device=cpu"]
    cfg = load_protocol_config("voc", "transfer/voc_synth.yaml", overrides + [f"checkpoint={a}"])
    with claimed_run_folder(out, run_identity("voc", sha256_file(a), to_dict(cfg))):
        (out / "seed0").mkdir()
        (out / "seed0" / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(RunFolderError, match="belongs to a voc run of checkpoint " + sha256_file(a)[:12]):
        run_protocol("voc", "transfer/voc_synth.yaml", overrides + [f"checkpoint={b}"])


def test_default_transfer_folders_differ_for_backbones_of_the_same_name(tmp_path):
    a = _random_ckpt(tmp_path / "run1" / "backbone.safetensors", 0)
    b = _random_ckpt(tmp_path / "run2" / "backbone.safetensors", 1)
    da, db = default_output_dir("voc", str(a)), default_output_dir("voc", str(b))
    assert da != db and da.name == f"voc_backbone_{sha256_file(a)[:12]}"


def test_pretrain_refuses_to_start_over_beside_its_checkpoints(tmp_path):
    root = tiny_synth(tmp_path / "synth")
    out = tmp_path / "pre"
    over = tiny_overrides(root, out) + ["optim.epochs=1", "monitor.knn_every=0", "run.tensorboard=false"]
    pretrain(load_config(PretrainConfig, "pretrain/demo_synth", over))
    rows = (out / "metrics.csv").read_text()
    with pytest.raises(RunFolderError, match="checkpoints and the run was not asked to resume"):
        pretrain(load_config(PretrainConfig, "pretrain/demo_synth", over))
    with pytest.raises(RunFolderError, match="differ in: config"):
        pretrain(load_config(PretrainConfig, "pretrain/demo_synth", over + ["optim.base_lr=0.2", "resume=auto"]))
    assert (out / "metrics.csv").read_text() == rows          # nothing mixed in
    pretrain(load_config(PretrainConfig, "pretrain/demo_synth", over + ["resume=auto"]))   # same run: fine


_DISK_FULL_CHILD = """
import resource, sys, torch
from cgh.checkpointing import save_checkpoint
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))   # files may grow to 1 MiB
try:
    save_checkpoint(sys.argv[1], 1, {"w": torch.zeros(1 << 20)})   # 4 MiB of weights
except Exception as e:
    print(type(e).__name__, "|", e)
"""


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    old = tmp_path / "checkpoints" / "epoch_0001.pt"
    old.parent.mkdir()
    old.write_bytes(b"the previous checkpoint")
    res = subprocess.run([sys.executable, "-c", _DISK_FULL_CHILD, str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    kind, _, msg = res.stdout.strip().partition(" | ")
    assert kind == "DiskFullError", res.stdout + res.stderr
    assert str(old) in msg and "no space left" in msg and "\n" not in msg
    assert old.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in old.parent.iterdir()] == [old.name]     # no temporary left behind


def test_full_disk_under_the_command_line(tmp_path):
    src = _random_ckpt(tmp_path / "src.safetensors", 0)
    out = tmp_path / "out.pth"
    out.write_bytes(b"old conversion")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "from cgh.cli import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", code, "convert", str(src), "--to", "torchvision", "-o", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0] and str(out) in lines[0]
    assert out.read_bytes() == b"old conversion"


def test_a_run_that_fails_on_bad_input_leaves_no_folder(synth_cls_root, tmp_path):
    ckpt = _random_ckpt(tmp_path / "r.safetensors", 0)
    out = tmp_path / "typo" / "run"
    with pytest.raises(CghError):
        run_protocol("knn", None, _knn(ckpt, tmp_path / "no-such-root", out))
    assert not out.exists()
    # a folder that was there before (a claimed run) is left alone
    run_protocol("knn", None, _knn(ckpt, synth_cls_root, out))
    before = (out / "result.json").read_bytes()
    with pytest.raises(CghError):
        run_protocol("knn", None, _knn(ckpt, tmp_path / "no-such-root", out))
    assert (out / "result.json").read_bytes() == before


def test_a_folder_given_as_checkpoint_is_named_as_such(tmp_path):
    from transfer.hub import CheckpointError, load_backbone

    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_backbone(tmp_path)
    with pytest.raises(CghError, match=r"checkpoint not found: .* \(a folder, not a file\)"):
        run_protocol("knn", None, _knn(tmp_path, tmp_path, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path):
    import signal
    import time

    from _helpers_trainer import RESUME_EPOCHS, _env, _resume_cmd

    root = tiny_synth(tmp_path / "synth")
    out = tmp_path / "run"
    proc = subprocess.Popen(_resume_cmd(root, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    first = out / "checkpoints" / "epoch_0001.pt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["cgh pretrain: interrupted; run the same command again to resume"]
    assert first.exists() and not (out / "backbone.safetensors").exists()
    res = subprocess.run(_resume_cmd(root, out, "--resume", "auto"), env=_env(), capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "resumed from" in res.stdout and (out / "backbone.safetensors").is_file()
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == RESUME_EPOCHS + 1   # header + epochs
