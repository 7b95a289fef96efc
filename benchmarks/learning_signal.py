"""Does a pretraining run learn? kNN top-1 of its backbone against the same arch at random init.

The measurement behind ``tests/test_learning_signal.py``, with a free step budget and device, so
the config that reaches the test's margin can be searched for where compute is cheap (a GPU):

    python benchmarks/learning_signal.py                                   # demo config, CPU
    python benchmarks/learning_signal.py --device cuda optim.epochs=200    # longer, on a GPU
    python benchmarks/learning_signal.py --root SYNTH --threads 1 optim.epochs=300 loss.warmup_epochs=30

Pretrains with ``--config`` (default ``pretrain/demo_synth``) plus the overrides on synthshapes
(generated into the output folder unless ``--root`` is given), then runs the kNN protocol
(``eval.knn``, k in {10, 20, 50}, best k) on the trained and on a randomly initialised backbone at
each ``--sizes`` resolution, and prints both, their difference, and the per-epoch loss / online
kNN history of the run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cgh.backbone import backbone_state_dict, build_backbone
from cgh.canonical import save_canonical
from cgh.config import load_config
from cgh.data.synth import generate
from cgh.records import read_record
from cgh.train import PretrainConfig, pretrain
from eval import knn

TEST_MARGIN = {64: 10.0}   # tests/test_learning_signal.py: points of kNN top-1 over random init, by size


def knn_top1(ckpt: Path, root: Path, out: Path, size: int, device: str) -> float:
    cfg = load_config(knn.Config, None, [f"checkpoint={ckpt}", f"output_dir={out}", "dataset=synthshapes",
                                         f"data_root={root}", f"resize={size}", f"crop={size}", "ks=[10,20,50]",
                                         "cache_dir=", "num_workers=0", f"device={device}"])
    return read_record(knn.run(cfg))["metrics"]["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pretrain/demo_synth")
    parser.add_argument("--root", help="synthshapes root (default: generate the default set)")
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    parser.add_argument("overrides", nargs="*", help="pretraining config overrides, e.g. optim.epochs=100")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out or tempfile.mkdtemp(prefix="cgh_learning_signal_"))
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.root) if args.root else out / "synthshapes"
    if not args.root:
        generate(root, seed=0)

    cfg = load_config(PretrainConfig, args.config, [f"data.root={root}", f"output_dir={out / 'pretrain'}",
                                                     f"run.device={args.device}", "run.tensorboard=false",
                                                     *args.overrides])
    start = time.perf_counter()
    trained = pretrain(cfg)
    seconds = time.perf_counter() - start

    torch.manual_seed(args.seed)
    random = save_canonical(backbone_state_dict(build_backbone(cfg.model.arch)), out / "random.safetensors",
                            method="random-init")
    history = read_record(trained.parent / "result.json")["extra"]["history"]
    rows = []
    for size in args.sizes:
        t = knn_top1(trained, root, out / f"knn_trained_{size}", size, args.device)
        r = knn_top1(random, root, out / f"knn_random_{size}", size, args.device)
        rows.append({"size": size, "trained": t, "random": r, "gain": round(t - r, 2),
                     "reaches_test_margin": t >= r + TEST_MARGIN[size] if size in TEST_MARGIN else None})
    keys = ("epoch", "loss", "infonce", "pos_precision", "knn_top1", "queue_rank_global", "queue_rank_hyper")
    print(json.dumps({"config": args.config, "overrides": args.overrides, "device": args.device,
                      "pretrain_seconds": round(seconds, 1), "epochs": cfg.optim.epochs,
                      "batch_size": cfg.optim.batch_size,
                      "history": [{k: round(h[k], 3) for k in keys if h.get(k) is not None} for h in history],
                      "knn_top1": rows}, indent=1))


if __name__ == "__main__":
    main()
