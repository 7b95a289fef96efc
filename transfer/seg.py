"""Semantic segmentation transfer (protocol ``seg``): mmsegmentation FCN on a dilated ResNet (D8).

mmselfsup's benchmark protocol: FCN with the pretrained ResNet as a D8 backbone, PASCAL VOC 2012 +
SBD aug at 512x512 for 20k iterations or Cityscapes at 769x769 for 40k
(``configs/transfer/mmseg/``). The checkpoint is converted to mmseg's ``ResNet`` names
(``transfer.convert.save_mmseg``) and loaded through the backbone's ``init_cfg``; before the first
iteration a hook compares every backbone tensor with the checkpoint (``transfer.backbone_check``).
The record holds mIoU, mAcc, aAcc and the per-class IoU from mmseg's IoU metric.

Every run keeps the protocol's images per optimizer step (``global_batch``: 16 for VOC12aug = 4 GPUs
x 4, 8 for Cityscapes = 4 x 2) whatever its number of processes (``plan_batch``): each process takes
global_batch / gpus images (``batch_mode=split``), or gradients are accumulated over several
iterations with the schedule stretched to match (``batch_mode=accumulate``). The record's
``extra.batch`` and the saved ``mmseg_config.py`` (``cgh_batch``) say what ran.

Resuming reads only what the run wrote itself (``transfer.resume_manifest``): mmengine's
``last_checkpoint`` is never consulted (the config names the verified checkpoint as ``load_from``,
through the ``cgh-verified://`` loader), every saved checkpoint is recorded by a hook, and a loaded
checkpoint's ``meta['config']`` (Python that mmengine would execute) is dropped before it is read.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import pickle
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from cgh.backbone import ArchError, feature_dim
from cgh.config import ConfigError, bounded, excerpt, resolve_config_path, save_config, to_dict
from cgh.errors import DatasetError
from cgh.records import RunTimer, write_record
from transfer.backbone_check import compare_backbone, require_equal_backbone
from transfer.convert import save_mmseg
from transfer.hub import load_backbone
from transfer.resume_manifest import latest_verified, load_verified, record_checkpoint

log = logging.getLogger(__name__)

PROTOCOL = "seg"
BACKBONE_REPORT = "backbone_check.json"
VERIFIED_SCHEME = "cgh-verified://"     # load_from prefix: a checkpoint recorded by this run
MMSEG_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}
BATCH_MODES = ("split", "accumulate")
# Schedulers whose value depends only on (step - begin) / (end - begin - 1) (mmengine's closed
# form of the poly schedule): ``accumulate`` maps them exactly onto optimizer steps.
ACCUMULABLE_SCHEDULERS = ("PolyLR", "PolyMomentum", "PolyParamScheduler")


@dataclass
class Config:
    checkpoint: str = MISSING
    output_dir: str = MISSING
    # The dataset folder the mmseg config's datasets read from (VOC2012 with SegmentationClassAug
    # and aug.txt; or the Cityscapes root with leftImg8bit/ and gtFine/).
    data_root: str = ""
    mmseg_config: str = "transfer/mmseg/fcn_r50-d8_voc12aug_512x512_20k.py"
    # Overrides of mmengine config keys, nested: {train_cfg: {max_iters: 100}}; on the command line
    # mmseg.train_cfg.max_iters=100.
    mmseg: dict[str, Any] = field(default_factory=dict)
    # "auto": backbone depth (and head input widths) from the checkpoint; a number must match it.
    depth: str = "auto"
    # "auto": the config's SyncBN on GPU, BN on CPU; or BN / SyncBN.
    norm: str = "auto"
    seed: int = bounded(0, ge=0)
    gpus: int = bounded(1, ge=1)         # GPUs on this machine (one process each)
    # Images per optimizer step, the protocol's whatever `gpus` is: mmselfsup's benchmark runs
    # 4 GPUs x the mmseg file's per-GPU batch (VOC12aug 4 x 4 = 16, Cityscapes 4 x 2 = 8).
    global_batch: int = bounded(16, ge=1)
    # How `gpus` processes reach global_batch. "split" (default): each takes global_batch / gpus
    # images, so BN normalises over the same global_batch images SyncBN pools over the protocol's
    # 4 GPUs (needs the memory for them); "accumulate": each keeps the mmseg file's per-GPU batch
    # (mmseg.train_dataloader.batch_size) and gradients add up over global_batch / (gpus x batch)
    # iterations, with iterations, intervals and the poly schedule stretched by that factor (less
    # memory, but BN then normalises over the per-GPU batch only).
    batch_mode: str = "split"
    resume: bool = True                  # continue from output_dir's last checkpoint
    overwrite: bool = False              # output_dir belongs to another run: move it aside, start fresh
    dataset_name: str = "voc12aug"
    split: str = "val"                   # the record's dataset.split (what the test loader reads)


def _walk(node, fn) -> None:
    """Apply ``fn`` to every dict inside a nested mmengine config (lists included)."""
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk(v, fn)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def register_mmseg_extensions() -> None:
    """Register the per-class IoU metric, the backbone-check and checkpoint-manifest hooks with
    mmseg's registries, and the ``cgh-verified://`` checkpoint loader with mmengine's."""
    import numpy as np
    import torch
    from mmengine.dist import is_main_process
    from mmengine.hooks import Hook
    from mmengine.runner import CheckpointLoader
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import HOOKS, METRICS

    if "CghIoUMetric" in METRICS.module_dict:
        return

    @CheckpointLoader.register_scheme(prefixes=VERIFIED_SCHEME)
    def load_from_cgh_verified(filename: str, map_location=None):   # mmengine logs name[10:]
        """A checkpoint this run recorded, checked and loaded with weights_only=True (never a URL)."""
        return load_verified(filename[len(VERIFIED_SCHEME):], map_location=map_location or "cpu")

    @METRICS.register_module()
    class CghIoUMetric(IoUMetric):
        """mmseg's IoUMetric, plus ``IoU.<class>`` for every class (NaN where a class never occurs)."""
        def compute_metrics(self, results: list) -> dict[str, float]:
            metrics = super().compute_metrics(results)
            inter = sum(r[0] for r in results).double()
            union = sum(r[1] for r in results).double()
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, float("nan")))
            for name, value in zip(self.dataset_meta["classes"], iou.tolist()):
                metrics[f"IoU.{name}"] = round(value * 100, 2) if np.isfinite(value) else float("nan")
            return metrics

    @HOOKS.register_module()
    class CghBackboneCheckHook(Hook):
        """Before the first iteration: the backbone must hold the checkpoint's tensors, bit for bit."""
        priority = "VERY_HIGH"

        def __init__(self, reference: str, report_path: str):
            self.reference, self.report_path = reference, report_path

        def before_train(self, runner) -> None:
            if runner.iter > 0:
                runner.logger.info("resumed at iteration %d; backbone check was done by the first run"
                                   % runner.iter)
                return
            from mmengine.dist import is_main_process

            model = getattr(runner.model, "module", runner.model)
            ref = torch.load(self.reference, map_location="cpu", weights_only=True)["state_dict"]
            report = compare_backbone(model.backbone.state_dict(), ref, lambda name: name)
            require_equal_backbone(report, self.report_path if is_main_process() else None)

    @HOOKS.register_module()
    class CghCheckpointManifestHook(Hook):
        """Records every checkpoint the run saves (``transfer.resume_manifest``), and drops a loaded
        checkpoint's ``meta['config']``, which ``Runner.resume`` would execute as Python (it only
        compares GPU counts with it; nothing else reads it)."""
        priority = "LOWEST"      # after CheckpointHook (VERY_LOW), which writes the file

        def __init__(self):
            self._saved = False

        def after_load_checkpoint(self, runner, checkpoint) -> None:
            if isinstance(checkpoint.get("meta"), dict):
                checkpoint["meta"].pop("config", None)

        def before_save_checkpoint(self, runner, checkpoint) -> None:
            self._saved = True   # CheckpointHook is writing runner.message_hub's 'last_ckpt'

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self._record(runner)

        def after_train_epoch(self, runner) -> None:
            self._record(runner)

        def _record(self, runner) -> None:
            if self._saved and is_main_process():
                record_checkpoint(runner.message_hub.get_info("last_ckpt"))
            self._saved = False


def check_mmseg_key(c, key: str, path) -> None:
    """An override must name a key the mmseg config has (as detectron2's yacs requires): mmengine
    would add a mistyped key silently and fail hundreds of log lines later (``max_iter`` for
    ``max_iters``: a TypeError inside the runner)."""
    node, done = c, []
    for part in key.split("."):
        if isinstance(node, (list, tuple)):
            found = part.isdigit() and int(part) < len(node)
            node = node[int(part)] if found else None
        else:
            found = hasattr(node, "keys") and part in node.keys()
            options = sorted(map(str, node.keys())) if hasattr(node, "keys") else []
            node = node[part] if found else None
        if not found:
            where = ".".join(done) or "the top level"
            close = difflib.get_close_matches(part, options, n=3) if not isinstance(node, list) and options else []
            hint = f"; did you mean {', '.join('mmseg.' + '.'.join(done + [o]) for o in close)}?" if close else ""
            raise ConfigError(f"config key 'mmseg.{key}': {path.name} has no '{part}' under {where}{hint}")
        done.append(part)


def _stretch_schedule(c, steps: int, path) -> None:
    """Iteration counts of ``c`` x ``steps`` (``batch_mode=accumulate``): as many optimizer steps as
    the protocol, with the protocol's lr at each of them.

    mmengine counts iterations (one per loader batch) everywhere: ``IterBasedTrainLoop``, the
    hooks' intervals, and ``ParamSchedulerHook`` steps every scheduler after every iteration, while
    ``OptimWrapper`` (``accumulative_counts``) steps the optimizer after iterations steps-1,
    2*steps-1, ... A poly scheduler [begin, end) is therefore moved to [steps*begin + steps - 1,
    steps*end): at optimizer step j (iteration (j+1)*steps - 1) it has made j*steps of its
    steps*(end - begin - 1) steps, the protocol's j of end - begin - 1.
    """
    loop = c.train_cfg
    if loop.get("type") != "IterBasedTrainLoop":
        raise ConfigError(f"config key 'batch_mode': accumulate needs an IterBasedTrainLoop; {path.name} "
                          f"has {loop.get('type')}")
    loop.max_iters *= steps
    if loop.get("val_interval"):
        loop.val_interval *= steps
    hooks = c.get("default_hooks") or {}
    if hooks.get("logger", {}).get("interval"):
        hooks.logger.interval *= steps
    checkpoint = hooks.get("checkpoint", {})
    if checkpoint.get("interval") and not checkpoint.get("by_epoch", True):   # CheckpointHook's default
        checkpoint.interval *= steps
    schedulers = c.get("param_scheduler") or []
    for s in [schedulers] if isinstance(schedulers, dict) else schedulers:
        if s.get("type") not in ACCUMULABLE_SCHEDULERS or s.get("by_epoch", True) or "end" not in s:
            raise ConfigError(f"config key 'batch_mode': accumulate rescales iteration-based "
                              f"{'/'.join(ACCUMULABLE_SCHEDULERS)} with an 'end' only; {path.name} has "
                              f"{excerpt(dict(s))}; use batch_mode=split")
        s.begin = steps * s.get("begin", 0) + steps - 1
        s.end = steps * s.end


def plan_batch(c, cfg, path) -> dict[str, Any]:
    """Set ``c``'s per-process batch (and gradient accumulation) so that one optimizer step sees
    ``cfg.global_batch`` images with ``cfg.gpus`` processes; refuse, with how to run it, when that
    is not possible. Returns the plan (``extra.batch`` of the record, ``cgh_batch`` of the config)."""
    mode, total, procs = cfg.batch_mode, int(cfg.global_batch), int(cfg.gpus)
    if mode not in BATCH_MODES:
        raise ConfigError(f"config key 'batch_mode': expected one of {', '.join(BATCH_MODES)}, "
                          f"got '{excerpt(mode)}'")
    loader = c.train_dataloader
    divisors = ", ".join(str(d) for d in range(1, total + 1) if total % d == 0)
    if mode == "split":
        if "train_dataloader.batch_size" in _flatten(to_dict(cfg.mmseg)):
            raise ConfigError("config key 'mmseg.train_dataloader.batch_size': with batch_mode=split the "
                              "per-process batch is global_batch / gpus; set global_batch, or use "
                              "batch_mode=accumulate to choose the per-GPU batch")
        if total % procs:
            raise ConfigError(f"config key 'gpus': global_batch={total} images do not split over "
                              f"gpus={procs}; run with gpus in ({divisors}), or batch_mode=accumulate "
                              f"with gpus x mmseg.train_dataloader.batch_size dividing {total}")
        per, steps = total // procs, 1
        loader.batch_size = per
    else:
        per = int(loader.batch_size)
        if total % (procs * per):
            raise ConfigError(f"config key 'batch_mode': accumulate needs gpus x "
                              f"mmseg.train_dataloader.batch_size to divide global_batch={total}, got "
                              f"{procs} x {per}; choose them with a product in ({divisors})")
        steps = total // (procs * per)
        if steps > 1:
            _stretch_schedule(c, steps, path)
    c.optim_wrapper.accumulative_counts = steps
    plan = {"mode": mode, "global_batch": total, "processes": procs, "per_process_batch": per,
            "accumulation_steps": steps}
    c.cgh_batch = dict(plan)    # in the saved config, beside the values it set
    log.info("%d images per optimizer step = %d process(es) x %d images x %d accumulated iteration(s) "
             "(batch_mode=%s)", total, procs, per, steps, mode)
    return plan


def build_mmseg_config(cfg, arch: str, weights: str | os.PathLike, cuda: bool):
    """The complete mmengine ``Config`` of the run (file + overrides + what the run decides)."""
    from mmengine.config import Config as MMConfig

    path = resolve_config_path(cfg.mmseg_config)
    try:
        c = MMConfig.fromfile(str(path))
    except Exception as e:           # mmengine raises many kinds for a bad file
        raise ConfigError(f"mmseg config {path}: {e}") from None
    overrides = _flatten(to_dict(cfg.mmseg))
    for key in overrides:
        check_mmseg_key(c, key, path)
    try:
        c.merge_from_dict(overrides)
    except Exception as e:
        raise ConfigError(f"mmseg config {path}: {e}") from None
    plan_batch(c, cfg, path)

    depth = MMSEG_DEPTHS.get(arch)
    if depth is None:
        raise ArchError(f"{arch} has no mmseg ResNet equivalent; supported: {', '.join(MMSEG_DEPTHS)}")
    if str(cfg.depth) != "auto" and int(cfg.depth) != depth:
        raise ArchError(f"the checkpoint {cfg.checkpoint} is a {arch} (depth {depth}) but the config "
                        f"asks for depth {cfg.depth}; use depth=auto or a checkpoint of depth {cfg.depth}")
    model = c.model
    if model.backbone.type != "ResNet":
        raise ConfigError(f"mmseg config {path}: the backbone must be mmseg's ResNet (torchvision "
                          f"names), not {model.backbone.type}")
    model.pretrained = None
    model.backbone.depth = depth
    model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(weights))
    # Head inputs follow the backbone: last stage for the decode head, the one before for the aux.
    last = feature_dim(arch)
    model.decode_head.in_channels = last
    if model.get("auxiliary_head"):
        model.auxiliary_head.in_channels = last // 2

    norm = cfg.norm if cfg.norm != "auto" else (None if cuda else "BN")
    if norm:
        _walk(model, lambda d: d.update(type=norm) if d.get("type") in ("SyncBN", "BN", "naiveSyncBN")
              and "requires_grad" in d else None)
        if c.get("norm_cfg"):   # the config file's shared variable, so the saved config says what ran
            c.norm_cfg.type = norm

    if cfg.data_root:
        _walk({k: c[k] for k in ("train_dataloader", "val_dataloader", "test_dataloader") if c.get(k)},
              lambda d: d.update(data_root=str(cfg.data_root)) if "data_root" in d else None)
    for k in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if c.get(k) is None:
            continue
        if os.environ.get("CGH_NUM_WORKERS"):   # the test suite asks for in-process data loading
            c[k].num_workers = int(os.environ["CGH_NUM_WORKERS"])
        if c[k].get("num_workers", 0) == 0:
            c[k].persistent_workers = False
    c.work_dir = str(Path(cfg.output_dir).resolve())
    # mmengine keeps one global Visualizer per name (mmseg's configs name it 'visualizer') and one
    # MessageHub per experiment name (by default the start second): a second run in this process
    # would write its logs into the first run's (possibly deleted) folder. Names of its own per run.
    c.experiment_name = f"cgh-seg-{uuid.uuid4().hex[:12]}"
    if isinstance(c.get("visualizer"), dict):
        c.visualizer.name = c.experiment_name
    # Resume only from a checkpoint this run recorded, named explicitly: with load_from unset,
    # mmengine would follow last_checkpoint (any file or URL) and, after training, reload the
    # final checkpoint before testing.
    verified = latest_verified(c.work_dir) if cfg.resume else None
    if verified is not None:
        log.info("resuming from %s (a checkpoint this run recorded; last_checkpoint is not read)", verified)
    elif cfg.resume and Path(c.work_dir).is_dir():
        log.info("no verified checkpoint of this run in %s: training from the start", c.work_dir)
    c.resume = verified is not None
    c.load_from = VERIFIED_SCHEME + str(verified) if verified is not None else None
    c.randomness = dict(seed=int(cfg.seed))
    c.launcher = "pytorch" if cfg.gpus > 1 else "none"
    if not cuda:
        c.env_cfg.dist_cfg = dict(backend="gloo")
    c.custom_hooks = list(c.get("custom_hooks", [])) + [dict(
        type="CghBackboneCheckHook", reference=str(weights),
        report_path=str(Path(cfg.output_dir) / BACKBONE_REPORT)), dict(type="CghCheckpointManifestHook")]
    return c


def check_data(c) -> None:
    """Every dataset folder and split file the built config reads exists (one error lists all)."""
    missing = []

    def check(d: dict) -> None:
        if "data_root" not in d or "type" not in d:
            return
        root = Path(d["data_root"])
        prefix = d.get("data_prefix") or {}
        paths = [root / p for p in prefix.values() if p] + ([root / d["ann_file"]] if d.get("ann_file") else [])
        missing.extend(str(p) for p in paths if not p.exists())

    _walk({k: c[k] for k in ("train_dataloader", "test_dataloader")}, check)
    if missing:
        raise DatasetError("segmentation data missing: expected " + ", ".join(dict.fromkeys(missing)))


MMENGINE_STATISTICS = ("min", "max", "current", "mean")   # HistoryBuffer's default statistics methods


def _history_buffer_statistic(obj, name: str):
    """The one ``getattr`` in mmengine's checkpoints: a ``HistoryBuffer`` statistics method (its log
    buffers keep them in a dict). Allow-listed in place of ``builtins.getattr``, which would let a
    crafted checkpoint reach any attribute of any object it can name; everything else is refused."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and (name in MMENGINE_STATISTICS or name in HistoryBuffer._statistics_methods):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"refused: the checkpoint asks for getattr({obj!r}, {name!r}); only "
                                 f"mmengine HistoryBuffer statistics methods may be looked up")


def _own_checkpoints_loadable():
    """Let ``torch.load(weights_only=True)`` read the resume checkpoints this run itself wrote.

    mmengine stores its log history (``HistoryBuffer`` of numpy arrays) in every checkpoint; these
    types are allow-listed by name, and ``getattr`` only as ``_history_buffer_statistic``, so
    loading still runs no arbitrary code.
    """
    import numpy as np
    import torch
    from mmengine.logging.history_buffer import HistoryBuffer

    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]
    return torch.serialization.safe_globals([
        HistoryBuffer, np.ndarray, np.dtype, np._core.multiarray.scalar, np._core.multiarray._reconstruct,
        (_history_buffer_statistic, "builtins.getattr"), *dtypes])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_and_test(rank: int, c, world: int, port: int, result: dict | None) -> dict:
    """One process: mmengine's Runner trains, then tests; rank 0's metrics are returned."""
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import mmseg.utils
    from mmengine.runner import Runner

    mmseg.utils.register_all_modules(init_default_scope=True)
    register_mmseg_extensions()
    with _own_checkpoints_loadable():
        runner = Runner.from_cfg(c)
        runner.train()
        metrics = runner.test()
    if result is not None and rank == 0:
        result.update(metrics)
    return metrics


def run(cfg) -> Path:
    timer = RunTimer()
    import torch

    ck = load_backbone(cfg.checkpoint)
    cuda = torch.cuda.is_available()
    if cfg.gpus < 1 or (cfg.gpus > 1 and cfg.gpus > torch.cuda.device_count()):
        raise ConfigError(f"gpus={cfg.gpus} but this machine has {torch.cuda.device_count()} CUDA devices")
    out = Path(cfg.output_dir)
    weights = out / "backbone_mmseg.pth"
    c = build_mmseg_config(cfg, ck.arch, weights, cuda)
    check_data(c)
    out.mkdir(parents=True, exist_ok=True)
    save_mmseg(ck.state_dict, weights, meta={"arch": ck.arch, "method": ck.method, "source_sha256": ck.sha256})
    save_config(cfg, out)
    c.dump(str(out / "mmseg_config.py"))

    if cfg.gpus > 1:
        import torch.multiprocessing as mp

        manager = mp.Manager()
        shared = manager.dict()
        mp.spawn(_train_and_test, args=(c, cfg.gpus, _free_port(), shared), nprocs=cfg.gpus)
        metrics = dict(shared)
    else:
        metrics = _train_and_test(0, c, 1, 0, None)

    per_class = {k[len("IoU."):]: (v if math.isfinite(v) else None)
                 for k, v in metrics.items() if k.startswith("IoU.")}
    backbone = json.loads((out / BACKBONE_REPORT).read_text())
    return write_record(
        out, protocol=PROTOCOL, checkpoint=ck.identity(),
        dataset={"name": cfg.dataset_name, "root": str(cfg.data_root or ""), "split": cfg.split},
        metrics={k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")}, config=to_dict(cfg),
        started=timer.started, wall_time_s=timer.elapsed, device=None if cuda else "cpu",
        extra={"per_class_iou": per_class, "mmseg_config": str(out / "mmseg_config.py"),
               "batch": dict(c.cgh_batch),
               "backbone_check": {k: backbone[k] for k in ("ok", "compared", "reference_tensors")}})
