"""Resuming a transfer run reads only checkpoints the run itself wrote and recorded (issue 17).

Anyone who can write to a run folder could plant a file there: a ``.pkl`` whose unpickling runs code,
a ``last_checkpoint`` naming an absolute path or a URL, an mmengine checkpoint whose
``meta['config']`` is Python that ``Runner.resume`` executes. Each attack below would create a
marker file (or hit a local HTTP server) if it worked; the rerun must not, and must complete from
the newest checkpoint the run recorded in ``cgh_checkpoints.json`` (or from the start).
"""
from __future__ import annotations

import http.server
import json
import logging
import os
import pickle
import shlex
import shutil
import threading

import pytest
import torch

from cgh.config import load_config
from cgh.data.synth import generate
from cgh.records import read_record
from transfer import resume_manifest, seg, voc
from transfer.detectron2_common import SEED_RESULT
from transfer.resume_manifest import MANIFEST, latest_verified, load_verified, record_checkpoint

from _helpers_data import TINY
from _helpers_transfer import one_thread  # noqa: F401  (fixture)


class _RunsCode:
    """Unpickles as ``os.system('touch MARKER')``: proof that loading executed planted code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class _CountingServer:
    """A local HTTP server serving a malicious file and counting the requests it gets."""

    def __init__(self, payload: bytes):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/x.pth"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))   # where a fetched file would land
    payload = pickle.dumps({"model": {}, "__author__": _RunsCode(tmp_path / "fetched_and_ran")})
    s = _CountingServer(payload)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_synth")
    generate(root, seed=0, **TINY)
    return root


def _copy_unfinished(src, dst):
    """A copy of a finished run whose results are gone: the rerun must take the resume path."""
    shutil.copytree(src, dst)
    for p in [dst / "result.json", *dst.glob(f"seed*/{SEED_RESULT}")]:
        p.unlink(missing_ok=True)
    last = dst / "last_checkpoint"      # mmengine's names an absolute path: make it the copy's
    if last.is_file() and last.read_text().startswith(str(src)):
        last.write_text(str(dst) + last.read_text()[len(str(src)):])
    return dst


def _tamper(path, **meta):
    """Rewrite a checkpoint with valid but different content (same name, new bytes)."""
    with seg._own_checkpoints_loadable():
        ck = torch.load(path, map_location="cpu", weights_only=True)
    for tensor in (ck["model"] if "model" in ck else ck["state_dict"]).values():
        if tensor.is_floating_point():
            tensor.zero_()
    if meta:
        ck["meta"].update(meta)
    path.unlink()
    torch.save(ck, path)


# ---- the manifest itself ------------------------------------------------------------------------

def test_manifest_picks_newest_matching_file_and_refuses_others(tmp_path, caplog):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.ones(2)}, a)
    record_checkpoint(a)
    torch.save({"w": torch.zeros(2)}, b)
    record_checkpoint(b)
    assert latest_verified(tmp_path) == b and torch.equal(load_verified(b)["w"], torch.zeros(2))

    torch.save({"w": torch.full((2,), 7.0)}, b)          # modified after the run wrote it
    with caplog.at_level(logging.WARNING):
        assert latest_verified(tmp_path) == a
    assert "b.pth: skipped for resuming: modified since the run wrote it" in caplog.text
    with pytest.raises(resume_manifest.ResumeError, match="modified since the run wrote it"):
        load_verified(b)
    planted = tmp_path / "planted.pth"
    torch.save({"w": torch.ones(2)}, planted)
    with pytest.raises(resume_manifest.ResumeError, match="not a checkpoint this run recorded"):
        load_verified(planted)

    # Entries that name a path, a parent or a URL are ignored, whatever their hash.
    outside = tmp_path.parent / f"{tmp_path.name}_outside.pth"
    torch.save({"w": torch.ones(2)}, outside)
    sha = resume_manifest._digest(outside)
    (tmp_path / MANIFEST).write_text(json.dumps({"checkpoints": [
        {"file": str(outside), "sha256": sha}, {"file": f"../{outside.name}", "sha256": sha},
        {"file": "http://127.0.0.1:9/x.pth", "sha256": sha}]}))
    assert latest_verified(tmp_path) is None
    (tmp_path / MANIFEST).write_text("{not json")
    assert latest_verified(tmp_path) is None


# ---- detectron2 (voc; coco shares the code) -------------------------------------------------------

def _voc_cfg(ckpt, root, out):
    # 3 iterations, a checkpoint every 2: model_0000001.pth (iteration 1), model_final.pth (iteration 2).
    return load_config(voc.Config, "transfer/voc_synth.yaml", [
        f"checkpoint={ckpt}", f"voc_root={root / 'VOCdevkit'}", f"output_dir={out}", "classes=auto",
        "detectron2.SOLVER.MAX_ITER=3", "detectron2.SOLVER.STEPS=[2]", "detectron2.SOLVER.WARMUP_ITERS=1",
        "detectron2.SOLVER.CHECKPOINT_PERIOD=2", "detectron2.TEST.PRECISE_BN.NUM_ITER=1"])


@pytest.fixture(scope="module")
def voc_short(random_ckpt, tiny_root, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("voc_short")
    voc.run(_voc_cfg(random_ckpt, tiny_root, out))
    names = [e["file"] for e in json.loads((out / "seed0" / MANIFEST).read_text())["checkpoints"]]
    assert names == ["model_0000001.pth", "model_final.pth"]
    return out


@pytest.mark.parametrize("where", ["in_folder", "absolute", "url"])
def test_voc_resume_ignores_planted_last_checkpoint(voc_short, random_ckpt, tiny_root, tmp_path, where,
                                                    server, caplog, one_thread):
    out = _copy_unfinished(voc_short, tmp_path / "run")
    marker = tmp_path / "planted_code_ran"
    evil = {"model": {}, "__author__": _RunsCode(marker)}
    target = {"in_folder": out / "seed0" / "evil.pkl", "absolute": tmp_path / "elsewhere" / "evil.pkl"}.get(where)
    if target is not None:
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(pickle.dumps(evil))
    named = {"in_folder": "evil.pkl", "absolute": str(target), "url": server.url}[where]
    (out / "seed0" / "last_checkpoint").write_text(named)

    with caplog.at_level(logging.INFO):
        rec = read_record(voc.run(_voc_cfg(random_ckpt, tiny_root, out)))
    assert not marker.exists() and not (tmp_path / "fetched_and_ran").exists() and server.hits == []
    seed = json.loads((out / "seed0" / SEED_RESULT).read_text())
    assert seed["resumed"] is True and rec["metrics"]["AP50"] is not None
    assert f"resumed from {out / 'seed0' / 'model_final.pth'} at iteration 3" in caplog.text


def test_voc_modified_checkpoint_is_not_resumed_from(voc_short, random_ckpt, tiny_root, tmp_path, caplog, one_thread):
    out = _copy_unfinished(voc_short, tmp_path / "run")
    final = out / "seed0" / "model_final.pth"
    _tamper(final)
    tampered = final.read_bytes()

    with caplog.at_level(logging.INFO):
        voc.run(_voc_cfg(random_ckpt, tiny_root, out))
    assert "model_final.pth: skipped for resuming: modified since the run wrote it" in caplog.text
    assert f"resumed from {out / 'seed0' / 'model_0000001.pth'} at iteration 2" in caplog.text
    # Iteration 2 was trained again and its checkpoint rewritten and recorded.
    assert final.read_bytes() != tampered and latest_verified(out / "seed0") == final


# ---- mmsegmentation -----------------------------------------------------------------------------

def _seg_cfg(ckpt, root, out):
    # 3 iterations, a checkpoint every 2: iter_2.pth and iter_3.pth (the last).
    return load_config(seg.Config, "transfer/seg_synth.yaml", [
        f"checkpoint={ckpt}", f"data_root={root / 'VOCdevkit' / 'VOC2012'}", f"output_dir={out}",
        "mmseg.train_cfg.max_iters=3", "mmseg.default_hooks.checkpoint.interval=2"])


@pytest.fixture(scope="module")
def seg_short(random_ckpt, tiny_root, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("seg_short")
    seg.run(_seg_cfg(random_ckpt, tiny_root, out))
    names = [e["file"] for e in json.loads((out / MANIFEST).read_text())["checkpoints"]]
    assert names == ["iter_2.pth", "iter_3.pth"]
    return out


def _config_payload(marker) -> str:
    """mmengine Config source that creates ``marker`` when executed."""
    return f"x = open({str(marker)!r}, 'w').close()\n"


@pytest.mark.parametrize("where", ["planted_checkpoint", "url"])
def test_seg_resume_ignores_planted_last_checkpoint(seg_short, random_ckpt, tiny_root, tmp_path, where, server,
                                                    caplog, one_thread):
    out = _copy_unfinished(seg_short, tmp_path / "run")
    marker = tmp_path / "planted_config_ran"
    if where == "planted_checkpoint":
        evil = out / "evil.pth"
        shutil.copy(out / "iter_3.pth", evil)
        _tamper(evil, config=_config_payload(marker))
        (out / "last_checkpoint").write_text(str(evil))
    else:
        (out / "last_checkpoint").write_text(server.url)

    with caplog.at_level(logging.INFO):
        rec = read_record(seg.run(_seg_cfg(random_ckpt, tiny_root, out)))
    assert not marker.exists() and not (tmp_path / "fetched_and_ran").exists() and server.hits == []
    assert f"resuming from {out / 'iter_3.pth'}" in caplog.text and rec["metrics"]["mIoU"] is not None


def test_seg_never_executes_a_stored_config_even_of_a_recorded_checkpoint(seg_short, random_ckpt, tiny_root,
                                                                          tmp_path, caplog, one_thread):
    """Whoever rewrites a checkpoint and its manifest entry gets it loaded, but only as data."""
    out = _copy_unfinished(seg_short, tmp_path / "run")
    marker = tmp_path / "stored_config_ran"
    _tamper(out / "iter_3.pth", config=_config_payload(marker))
    record_checkpoint(out / "iter_3.pth")

    with caplog.at_level(logging.INFO):
        rec = read_record(seg.run(_seg_cfg(random_ckpt, tiny_root, out)))
    assert not marker.exists() and rec["metrics"]["mIoU"] is not None
    assert f"resuming from {out / 'iter_3.pth'}" in caplog.text


def test_seg_modified_checkpoint_is_not_resumed_from(seg_short, random_ckpt, tiny_root, tmp_path, caplog, one_thread):
    out = _copy_unfinished(seg_short, tmp_path / "run")
    last = out / "iter_3.pth"
    _tamper(last)
    tampered = last.read_bytes()

    with caplog.at_level(logging.INFO):
        seg.run(_seg_cfg(random_ckpt, tiny_root, out))
    assert "iter_3.pth: skipped for resuming: modified since the run wrote it" in caplog.text
    assert f"resuming from {out / 'iter_2.pth'}" in caplog.text
    # Iteration 3 was trained again and its checkpoint rewritten and recorded.
    assert last.read_bytes() != tampered and latest_verified(out) == last
