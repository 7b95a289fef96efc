"""What VOC detection and COCO instance segmentation share: one detectron2 run per seed, then a record.

The flow of ``run_detectron2_protocol`` (used by ``transfer.voc`` and ``transfer.coco``):

1. read the checkpoint through ``transfer.hub`` and check the data paths, so bad input fails before
   anything is built or trained;
2. convert the backbone to detectron2's ``.pkl`` (``transfer.convert.save_detectron2``) and build the
   complete detectron2 config (YAML under ``configs/transfer/detectron2/`` + overrides, scaled to the
   run's batch (``batch_scaling``), + depth, norm, device, datasets, weights), saved next to the run;
3. per seed, train with detectron2's ``DefaultTrainer`` (through ``detectron2.engine.launch`` for
   several GPUs or machines), resuming from the newest checkpoint the seed's run recorded itself
   (``ManifestCheckpointer``; ``last_checkpoint`` is never read); before the first
   iteration every backbone tensor of the built model is compared with the checkpoint
   (``transfer.backbone_check``) and the report saved;
4. the task's evaluator (PASCAL VOC or COCO) runs at the end of training; the per-seed metrics and
   their mean/std land in ``result.json`` (``extra.seeds``: how many seeds ran; ``extra.batch_scaling``:
   what the batch scaling changed).

The protocol modules provide only their dataset part (see ``Detectron2Task``).
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import MISSING

from cgh.backbone import ArchError
from cgh.config import ConfigError, bounded, excerpt, resolve_config_path, save_config, to_dict
from cgh.errors import CghError
from cgh.io import atomic_write_json
from cgh.records import RunTimer, write_record
from transfer.backbone_check import compare_backbone, require_equal_backbone
from transfer.compat.detectron2_compat import import_detectron2
from transfer.convert import from_detectron2_name, save_detectron2
from transfer.hub import LoadedCheckpoint, load_backbone
from transfer.resume_manifest import latest_verified, load_verified, record_checkpoint
from transfer.safe_load import load_pickle

log = logging.getLogger(__name__)

SEED_RESULT = "cgh_seed_result.json"     # written by the main process of each seed's run
BACKBONE_REPORT = "backbone_check.json"
WEIGHTS_NAME = "backbone_detectron2.pkl"

# torchvision arch -> (MODEL.RESNETS.DEPTH, RES2_OUT_CHANNELS, WIDTH_PER_GROUP)
D2_RESNETS = {
    "resnet18": (18, 64, 64), "resnet34": (34, 64, 64), "resnet50": (50, 256, 64),
    "resnet101": (101, 256, 64), "resnet152": (152, 256, 64), "wide_resnet50_2": (50, 256, 128),
}
_NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")
BATCH_SCALING = ("linear", "none")
# What a global batch other than the reference one changes (detectron2's auto_scale_workers).
SCALED_KEYS = ("SOLVER.BASE_LR", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS",
               "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD")


@dataclass
class Detectron2Config:
    """Settings shared by the detectron2 protocols (``voc``, ``coco``); defaults follow MoCo."""
    checkpoint: str = MISSING
    output_dir: str = MISSING
    # detectron2 YAML (path, or name under configs/); complete and self-contained.
    detectron2_config: str = MISSING
    # Overrides of detectron2 keys, nested like its YAML: {SOLVER: {MAX_ITER: 200}}; on the command
    # line: detectron2.SOLVER.MAX_ITER=200.
    detectron2: dict[str, Any] = field(default_factory=dict)
    # "auto": MODEL.RESNETS.DEPTH (and R18/R34 widths) from the checkpoint; a number must match it.
    depth: str = "auto"
    # "auto": the YAML's norm (SyncBN, naiveSyncBN) on GPU, BN on CPU (both need CUDA; AMP is
    # turned off on CPU for the same reason); or BN/SyncBN/naiveSyncBN/... everywhere.
    norm: str = "auto"
    device: str = "auto"                 # auto | cpu | cuda
    seeds: int = bounded(1, ge=1)        # repeat with SEED = first_seed + i; the record has mean/std
    # The global batch (SOLVER.IMS_PER_BATCH) the YAML's lr and schedule are written for: 16 in
    # MoCo's protocol (8 GPUs x 2 images). Values in the YAML and in `detectron2` are for this batch.
    reference_batch: int = bounded(16, ge=1)
    # IMS_PER_BATCH != reference_batch (fewer GPUs): "linear" scales BASE_LR by batch/reference and
    # MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD, TEST.EVAL_PERIOD by reference/batch, with
    # detectron2's own DefaultTrainer.auto_scale_workers (the linear rule of Goyal et al.), so the
    # run sees as many images at the same lr per image; "none" keeps them (and warns).
    batch_scaling: str = "linear"
    first_seed: int = bounded(0, ge=0)   # (detectron2 reads a negative SEED as "random")
    gpus: int = bounded(1, ge=1)         # GPUs per machine (detectron2.engine.launch)
    num_machines: int = bounded(1, ge=1)
    machine_rank: int = bounded(0, ge=0, lt="num_machines")
    dist_url: str = "auto"
    resume: bool = True                  # continue from each seed folder's last checkpoint
    overwrite: bool = False              # output_dir belongs to another run: move it aside, start fresh
    dataset_name: str = MISSING          # the record's dataset.name


@dataclass
class DatasetSpec:
    """Registered detectron2 datasets for one run (names are registered in every process)."""
    train: list[str]
    test: str
    classes: list[str]
    record: dict                         # the record's ``dataset`` block


class Detectron2Task(Protocol):
    """What ``transfer.voc`` / ``transfer.coco`` provide (module-level, importable by name)."""
    PROTOCOL: str

    def check_data(self, cfg) -> None: ...
    def register_datasets(self, cfg) -> DatasetSpec: ...
    def build_evaluator(self, cfg_d2, dataset_name: str, output_dir: str): ...
    def metrics(self, results: dict) -> dict[str, float]: ...


# ---- detectron2 pieces ------------------------------------------------------------------------------

def register_extra_norm_roi_heads() -> None:
    """Register ``Res5ROIHeadsExtraNorm``: the res5 ROI head of R-C4, depth-aware, plus one norm.

    MoCo's detection protocol appends a norm layer after res5 so that the head's features are
    normalised like the backbone's. detectron2's own res5 head is always three bottleneck blocks;
    here R18/R34 get their basic blocks, so a small ResNet's layer4 loads into the head too.
    """
    import_detectron2()
    from torch import nn
    from detectron2.layers import get_norm
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
    from detectron2.modeling.roi_heads import Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        @classmethod
        def _build_res5_block(cls, cfg):
            depth, norm = cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.NORM
            if depth in (18, 34):
                out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
                n = {18: 2, 34: 3}[depth]
                blocks = ResNet.make_stage(BasicBlock, n, stride_per_block=[2] + [1] * (n - 1),
                                           in_channels=out_channels // 2, out_channels=out_channels,
                                           norm=norm)
                seq = nn.Sequential(*blocks)
            else:
                seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(norm, out_channels))
            return seq, out_channels


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def _get(cfg_d2, key: str):
    node = cfg_d2
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"config key 'device': expected auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is cuda but no CUDA device is available")
    return device


def check_depth(cfg, arch: str) -> tuple[int, int, int]:
    """detectron2's (DEPTH, RES2_OUT_CHANNELS, WIDTH_PER_GROUP) for ``arch``; ``ArchError`` when the
    config asks for another depth than the checkpoint has (``depth=auto`` takes the checkpoint's)."""
    if arch not in D2_RESNETS:
        raise ArchError(f"{arch} has no detectron2 ResNet equivalent; supported: {', '.join(D2_RESNETS)}")
    depth, res2, width = D2_RESNETS[arch]
    if str(cfg.depth) != "auto" and (not str(cfg.depth).isdigit() or int(cfg.depth) != depth):
        raise ArchError(f"the checkpoint {cfg.checkpoint} is a {arch} (depth {depth}) but the config "
                        f"asks for depth {cfg.depth}; use depth=auto or a checkpoint of depth {cfg.depth}")
    return depth, res2, width


def check_batch_scaling(cfg) -> str:
    if cfg.batch_scaling not in BATCH_SCALING:
        raise ConfigError(f"config key 'batch_scaling': expected one of {', '.join(BATCH_SCALING)}, "
                          f"got '{excerpt(cfg.batch_scaling)}'")
    return cfg.batch_scaling


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def scale_to_batch(c, cfg, announce: bool = True):
    """``c`` (a detectron2 config written for ``cfg.reference_batch``) for its own IMS_PER_BATCH.

    ``linear``: detectron2's ``DefaultTrainer.auto_scale_workers`` does the arithmetic: with
    IMS_PER_BATCH = REFERENCE_WORLD_SIZE = reference (one image per "worker"), asking for ``batch``
    workers scales by batch/reference exactly as it would for a change of GPU count. Then
    REFERENCE_WORLD_SIZE is 0 again, so the trainer does not scale a second time by its world size.
    Returns (the new config, the record's ``batch_scaling``: mode, reference_batch, ims_per_batch,
    factor = ims_per_batch / reference_batch, scaled = {key: [before, after]}). ``announce``: log
    it (once per run).
    """
    mode = check_batch_scaling(cfg)
    batch, reference = int(c.SOLVER.IMS_PER_BATCH), int(cfg.reference_batch)
    record = {"mode": mode, "reference_batch": reference, "ims_per_batch": batch,
              "factor": batch / reference, "scaled": {}}
    if batch == reference:
        return c, record
    if mode == "none":
        if announce:
            log.warning("SOLVER.IMS_PER_BATCH is %d, not the protocol's %d, and batch_scaling=none: "
                        "lr and iterations are not scaled (BASE_LR %s, MAX_ITER %s, STEPS %s, WARMUP_ITERS %s)",
                        batch, reference, c.SOLVER.BASE_LR, c.SOLVER.MAX_ITER, _plain(c.SOLVER.STEPS),
                        c.SOLVER.WARMUP_ITERS)
        return c, record
    if c.SOLVER.REFERENCE_WORLD_SIZE:
        raise ConfigError("config keys 'batch_scaling' (linear) and 'detectron2.SOLVER.REFERENCE_WORLD_SIZE' "
                          "would both scale the schedule; set batch_scaling=none to use detectron2's")
    from detectron2.engine import DefaultTrainer

    before = {k: _get(c, k) for k in SCALED_KEYS}
    c = c.clone()
    c.SOLVER.IMS_PER_BATCH = c.SOLVER.REFERENCE_WORLD_SIZE = reference
    c = DefaultTrainer.auto_scale_workers(c, batch)
    c.SOLVER.REFERENCE_WORLD_SIZE = 0
    record["scaled"] = {k: [_plain(before[k]), _plain(_get(c, k))] for k in SCALED_KEYS
                        if _plain(before[k]) != _plain(_get(c, k))}
    if announce:
        log.warning("SOLVER.IMS_PER_BATCH is %d, not the protocol's %d: linear scaling (batch_scaling=linear) "
                    "changed %s", batch, reference,
                    ", ".join(f"{k} {a} -> {b}" for k, (a, b) in record["scaled"].items()) or "nothing")
    return c, record


def protocol_config(cfg, announce: bool = True):
    """The protocol's detectron2 config before the run's own settings: the YAML, the ``detectron2``
    overrides, then ``scale_to_batch``. Returns (``CfgNode``, the scaling record)."""
    import_detectron2()
    from detectron2.config import get_cfg

    c = get_cfg()
    c.merge_from_file(str(resolve_config_path(cfg.detectron2_config)))
    pairs = []
    for key, value in _flatten(to_dict(cfg.detectron2)):
        current = _get(c, key)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)     # yacs refuses 1 for a float key; YAML users write 1
        pairs += [key, value]
    try:
        c.merge_from_list(pairs)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"config key 'detectron2': {e}") from None
    return scale_to_batch(c, cfg, announce)


def build_detectron2_config(cfg, arch: str, weights: str | os.PathLike, device: str, data: DatasetSpec,
                            output_dir: str | os.PathLike, seed: int, announce: bool = True):
    """The complete detectron2 ``CfgNode`` of one run (``protocol_config`` + what the run decides)."""
    c, _ = protocol_config(cfg, announce)
    depth, res2, width = check_depth(cfg, arch)
    c.MODEL.RESNETS.DEPTH, c.MODEL.RESNETS.RES2_OUT_CHANNELS = depth, res2
    c.MODEL.RESNETS.WIDTH_PER_GROUP = width

    if cfg.norm == "auto":
        if device == "cpu":
            for key in _NORM_KEYS:
                if _get(c, key) in ("SyncBN", "naiveSyncBN"):
                    c.merge_from_list([key, "BN"])
    else:
        for key in _NORM_KEYS:
            if key == "MODEL.RESNETS.NORM" or _get(c, key):
                c.merge_from_list([key, cfg.norm])

    if device == "cpu" and c.SOLVER.AMP.ENABLED:
        c.SOLVER.AMP.ENABLED = False     # detectron2's AMPTrainer needs CUDA (as SyncBN -> BN above)

    c.MODEL.DEVICE = device
    c.MODEL.WEIGHTS = str(weights)
    c.MODEL.ROI_HEADS.NUM_CLASSES = len(data.classes)
    c.DATASETS.TRAIN = tuple(data.train)
    c.DATASETS.TEST = (data.test,)
    c.OUTPUT_DIR = str(output_dir)
    c.SEED = int(seed)
    if os.environ.get("CGH_NUM_WORKERS"):    # the test suite asks for in-process data loading
        c.DATALOADER.NUM_WORKERS = int(os.environ["CGH_NUM_WORKERS"])
    c.freeze()
    return c


_D2_BACKBONE = re.compile(r"^(?:backbone\.(?:bottom_up\.)?|roi_heads\.)((?:stem|res[2-5])\..*)$")


def detectron2_to_torchvision_name(name: str) -> str | None:
    """Model parameter name -> torchvision name; ``None`` for layers the checkpoint does not provide
    (FPN, heads, and the extra norm after res5)."""
    m = _D2_BACKBONE.match(name)
    if not m or m.group(1).startswith("res5.norm."):
        return None
    return from_detectron2_name(m.group(1))


def verify_detectron2_backbone(model, reference: dict, report_path: str | os.PathLike | None = None) -> dict:
    """Every backbone tensor of a built detectron2 model must equal the checkpoint's (else raise)."""
    model = getattr(model, "module", model)    # DistributedDataParallel
    report = compare_backbone(model.state_dict(), reference, detectron2_to_torchvision_name)
    return require_equal_backbone(report, report_path)


def _json_numbers(tree):
    """Evaluator output as plain JSON: floats, with NaN/inf (e.g. AP of an absent size) as None."""
    if isinstance(tree, dict):
        return {str(k): _json_numbers(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_json_numbers(v) for v in tree]
    if isinstance(tree, (int, float)) or hasattr(tree, "item"):
        v = float(tree)
        return v if math.isfinite(v) else None
    return tree


def _mean_iteration_time(output_dir: Path) -> float | None:
    """Mean of detectron2's per-iteration ``time`` (s) from its metrics.json, first 10% excluded."""
    path = output_dir / "metrics.json"
    if not path.is_file():
        return None
    times = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "time" in row:
            times.append(float(row["time"]))
    times = times[len(times) // 10:]
    return sum(times) / len(times) if times else None


_MANIFEST_CHECKPOINTER = None
_UNCHECKED = object()


def manifest_checkpointer_class():
    """``DetectionCheckpointer`` that resumes only from checkpoints the run recorded itself.

    fvcore resumes from whatever ``last_checkpoint`` names (a planted ``.pkl``, an absolute path, a
    URL) and detectron2 opens ``.pkl`` files with plain ``pickle``: either runs code planted in the
    run folder. Here every save is recorded in ``transfer.resume_manifest``; ``has_checkpoint`` and
    ``get_checkpoint_file`` answer from that record only; a ``.pkl`` (``MODEL.WEIGHTS``, our own
    converted backbone) is read with ``transfer.safe_load``'s restricted unpickler and anything else
    must be a recorded checkpoint, loaded with ``torch.load(weights_only=True)``.
    """
    global _MANIFEST_CHECKPOINTER
    if _MANIFEST_CHECKPOINTER is not None:
        return _MANIFEST_CHECKPOINTER
    import_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer

    class ManifestCheckpointer(DetectionCheckpointer):
        _verified = _UNCHECKED          # the newest verified checkpoint, looked up once per save

        def save(self, name: str, **kwargs) -> None:
            super().save(name, **kwargs)
            if self.save_dir and self.save_to_disk:
                path = Path(self.save_dir) / f"{name}.pth"
                record_checkpoint(path)
                self._verified = path

        def _latest(self) -> Path | None:
            if self._verified is _UNCHECKED:
                self._verified = latest_verified(self.save_dir) if self.save_dir else None
            return self._verified

        def has_checkpoint(self) -> bool:
            return self._latest() is not None

        def get_checkpoint_file(self) -> str:
            latest = self._latest()
            return str(latest) if latest is not None else ""

        def _load_file(self, filename: str) -> dict:
            if filename.endswith(".pkl"):         # detectron2's handling of a .pkl, minus pickle.load
                data = load_pickle(Path(filename))
                if "model" in data and "__author__" in data:
                    self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                    return data
                if "blobs" in data:
                    data = data["blobs"]
                data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
                return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
            loaded = load_verified(filename)
            return loaded if "model" in loaded else {"model": loaded}

    _MANIFEST_CHECKPOINTER = ManifestCheckpointer
    return ManifestCheckpointer


# ---- one seed (runs in every process of a launch) -----------------------------------------------------

def _train_one_seed(task_module: str, cfg_dict: dict, cfg_d2, reference: dict, resume: bool) -> None:
    import_detectron2()
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    task = importlib.import_module(task_module)
    task.register_datasets(cfg_dict)          # each spawned process has its own catalogs
    register_extra_norm_roi_heads()
    out = Path(cfg_d2.OUTPUT_DIR)
    d2_logger = setup_logger(distributed_rank=comm.get_rank(), name="detectron2")  # console, once
    log_file = logging.FileHandler(out / f"log_rank{comm.get_rank()}.txt")
    log_file.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    d2_logger.addHandler(log_file)
    try:
        _train(task, cfg_d2, reference, resume, out)
    finally:
        d2_logger.removeHandler(log_file)
        log_file.close()


def _train(task, cfg_d2, reference: dict, resume: bool, out: Path) -> None:
    from detectron2.engine import DefaultTrainer, hooks
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(cfg_d2.SEED + comm.get_rank())

    class Trainer(DefaultTrainer):
        """DefaultTrainer whose evaluation is the task's evaluator, run once after training, and
        whose checkpointer resumes only from checkpoints this run recorded (see above)."""
        @classmethod
        def build_evaluator(cls, c, dataset_name):
            return task.build_evaluator(c, dataset_name, str(out / "inference"))

        def build_hooks(self):
            # __init__ made self.checkpointer just before calling this; the PeriodicCheckpointer
            # built below saves through it, so replace it first.
            ck = self.checkpointer
            self.checkpointer = manifest_checkpointer_class()(
                ck.model, ck.save_dir, save_to_disk=ck.save_to_disk, **ck.checkpointables)
            return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]

    trainer = Trainer(cfg_d2)
    resuming = resume and trainer.checkpointer.has_checkpoint()
    trainer.resume_or_load(resume=resume)
    if resuming:
        log.info("resumed from %s at iteration %d (a checkpoint this run recorded; last_checkpoint is "
                 "not read); backbone check was done by the first run",
                 trainer.checkpointer.get_checkpoint_file(), trainer.start_iter)
    else:
        if resume:
            log.info("no verified checkpoint of this run in %s: training from the start", out)
        verify_detectron2_backbone(trainer.model, reference,
                                   out / BACKBONE_REPORT if comm.is_main_process() else None)
    trainer.train()          # precise BN (when enabled) runs after the last iteration
    results = Trainer.test(cfg_d2, trainer.model)
    if comm.is_main_process():
        atomic_write_json(out / SEED_RESULT, {
            "seed": cfg_d2.SEED, "metrics": _json_numbers(task.metrics(results)),
            "evaluator": _json_numbers(results),
            "resumed": bool(resuming), "seconds_per_iter": _mean_iteration_time(out),
            "max_iter": cfg_d2.SOLVER.MAX_ITER, "ims_per_batch": cfg_d2.SOLVER.IMS_PER_BATCH})


# ---- the protocol -------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    # one run has no spread to report: None, not 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def aggregate_runs(runs: list[dict]) -> dict[str, float | None]:
    """Mean over seeds of each metric, plus ``<metric>_std`` (sample standard deviation)."""
    metrics: dict[str, float | None] = {}
    for name in runs[0]["metrics"]:
        mean, std = _mean_std([r["metrics"].get(name) for r in runs])
        metrics[name], metrics[f"{name}_std"] = mean, std
    return metrics


def check_launch(cfg, device: str) -> None:
    import torch

    if cfg.seeds < 1:
        raise ConfigError(f"config key 'seeds' must be >= 1, got {cfg.seeds}")
    if cfg.gpus < 1 or cfg.num_machines < 1 or not 0 <= cfg.machine_rank < cfg.num_machines:
        raise ConfigError(f"invalid launch: gpus={cfg.gpus}, num_machines={cfg.num_machines}, "
                          f"machine_rank={cfg.machine_rank}")
    if cfg.dist_url == "auto" and cfg.num_machines > 1:
        raise ConfigError("several machines need an explicit dist_url (tcp://HOST:PORT of machine 0)")
    if device == "cpu" and (cfg.gpus > 1 or cfg.num_machines > 1):
        raise ConfigError("several GPUs or machines were asked for, but the run is on CPU")
    if device == "cuda" and cfg.gpus > torch.cuda.device_count():
        raise ConfigError(f"gpus={cfg.gpus} but this machine has {torch.cuda.device_count()} CUDA devices")


def run_detectron2_protocol(cfg, task_module: str) -> Path:
    """Run ``task_module``'s protocol (see module docstring); return the record's path."""
    timer = RunTimer()
    task = importlib.import_module(task_module)
    device = resolve_device(cfg.device)
    check_launch(cfg, device)
    _, scaling = protocol_config(cfg)        # bad overrides fail here; the scaling is logged once
    ck: LoadedCheckpoint = load_backbone(cfg.checkpoint)
    check_depth(cfg, ck.arch)
    task.check_data(cfg)
    import_detectron2()
    from detectron2.engine import launch

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = to_dict(cfg)
    data = task.register_datasets(cfg_dict)
    weights = save_detectron2(ck.state_dict, out / WEIGHTS_NAME)
    save_config(cfg, out)

    runs = []
    for i in range(cfg.seeds):
        seed = cfg.first_seed + i
        seed_dir = out / f"seed{seed}"
        cfg_d2 = build_detectron2_config(cfg, ck.arch, weights, device, data, seed_dir, seed, announce=False)
        done = seed_dir / SEED_RESULT
        if not done.is_file():
            seed_dir.mkdir(parents=True, exist_ok=True)
            (seed_dir / "detectron2_config.yaml").write_text(cfg_d2.dump())
            launch(_train_one_seed, cfg.gpus, num_machines=cfg.num_machines,
                   machine_rank=cfg.machine_rank, dist_url=cfg.dist_url,
                   args=(task_module, cfg_dict, cfg_d2, ck.state_dict, cfg.resume))
        if cfg.machine_rank != 0:
            continue                 # machine 0 writes the results
        if not done.is_file():
            raise CghError(f"seed {seed} finished without results ({done} is missing)")
        run = json.loads(done.read_text())
        run["output_dir"] = str(seed_dir)
        runs.append(run)
    record = out / "result.json"
    if cfg.machine_rank != 0:
        return record
    backbone = json.loads((out / f"seed{cfg.first_seed}" / BACKBONE_REPORT).read_text())
    return write_record(
        out, protocol=task.PROTOCOL, checkpoint=ck.identity(), dataset=data.record,
        metrics=aggregate_runs(runs), config=cfg_dict, started=timer.started, wall_time_s=timer.elapsed,
        device=None if device == "cuda" else "cpu",
        extra={"seeds": len(runs), "batch_scaling": scaling, "runs": runs,
               "detectron2_config": str(out / f"seed{cfg.first_seed}" / "detectron2_config.yaml"),
               "backbone_check": {k: backbone[k] for k in ("ok", "compared", "reference_tensors")},
               "classes": data.classes})
