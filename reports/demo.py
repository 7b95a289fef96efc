"""The end-to-end demo (``make demo``): offline, CPU, about 9 minutes on 2 cores.

1. generate the synthshapes benchmark;
2. pretrain CGH (cross-context) and the ReSSL baseline (global-context) briefly on it;
3. add a randomly initialised backbone and the CGH backbone re-saved the way MoCo saves its
   checkpoints (a third-party layout the hub must read);
4. ``cgh compare`` the four checkpoints with the ``demo`` suite (kNN, fast linear probe, 1% / 10%
   semi-supervised, VOC detection, COCO instance segmentation, segmentation);
5. write the report (pretraining curves included) and print where it is and a summary table.

Every step reuses what an earlier, interrupted demo already finished.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEMO_PRETRAIN = "pretrain/demo_synth"
VARIANTS = {  # name -> overrides of the demo pretraining config
    "cgh": ["method=cgh", "loss.mode=cross"],
    "ressl": ["method=ressl", "loss.mode=global"],   # paper Sec. 4.5.1: global-context == ReSSL
}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def synth_data(root: Path) -> Path:
    """Generate the demo's synthshapes once; a root from an older generator is an error, since
    every later step of an earlier demo was computed on it."""
    from cgh.data.synth import FORMAT_VERSION, MANIFEST, generate, read_manifest
    from cgh.errors import DatasetError

    if not (root / MANIFEST).is_file():       # the manifest is written last: present = complete
        _log(f"generating synthshapes in {root}")
        generate(root, seed=0)
    elif (version := read_manifest(root).get("format_version")) != FORMAT_VERSION:
        raise DatasetError(f"{root} holds synthshapes format {version}, but this version generates format "
                           f"{FORMAT_VERSION}; delete {root.parent} (an earlier demo's output) or pass "
                           "another --output")
    return root


def pretrain_variant(name: str, data_root: Path, out: Path, extra: list[str]) -> Path:
    """Pretrain one variant, unless a finished run with the same config is already there."""
    from cgh.config import to_dict
    from cgh.records import RECORD_NAME, RecordError, read_record
    from cgh.train import load_pretrain_config, pretrain

    cfg = load_pretrain_config(DEMO_PRETRAIN, VARIANTS[name] + [f"data.root={data_root}", f"output_dir={out}",
                                                               "resume=auto"] + extra)
    backbone = out / "backbone.safetensors"
    try:
        if backbone.is_file() and read_record(out / RECORD_NAME)["config"] == to_dict(cfg):
            _log(f"pretraining {name}: done before ({backbone})")
            return backbone
    except (RecordError, FileNotFoundError):
        pass
    _log(f"pretraining {name} -> {out}")
    return Path(pretrain(cfg))


def random_init(path: Path, arch: str = "resnet18") -> Path:
    """The from-scratch reference: torchvision's initialisation, seed 0, as a canonical checkpoint."""
    from cgh.backbone import backbone_state_dict, build_backbone
    from cgh.canonical import save_canonical

    if not path.is_file():
        torch.manual_seed(0)
        save_canonical(backbone_state_dict(build_backbone(arch)), path, method="random-init", arch=arch)
    return path


def moco_layout(src: Path, path: Path) -> Path:
    """Re-save a canonical backbone the way MoCo v2's main_moco.py saves a checkpoint.

    ``{"epoch", "arch", "state_dict": DDP model state (module.encoder_q.*, module.encoder_k.*, the
    MLP head as fc.0 / fc.2, module.queue, module.queue_ptr), "optimizer"}``. The hub must find the
    query encoder and ignore the rest; the same weights must then give the same numbers.
    """
    from cgh.backbone import feature_dim
    from cgh.canonical import load_canonical

    if path.is_file():
        return path
    tensors, meta = load_canonical(src)
    dim, hidden = 128, feature_dim(meta["arch"])
    g = torch.Generator().manual_seed(0)
    head = {"fc.0.weight": torch.randn(hidden, hidden, generator=g) * 0.01, "fc.0.bias": torch.zeros(hidden),
            "fc.2.weight": torch.randn(dim, hidden, generator=g) * 0.01, "fc.2.bias": torch.zeros(dim)}
    state = {}
    for encoder in ("encoder_q", "encoder_k"):
        for k, v in {**tensors, **head}.items():
            state[f"module.{encoder}.{k}"] = v.clone()
    state["module.queue"] = torch.nn.functional.normalize(torch.randn(dim, 4096, generator=g), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    ckpt = {"epoch": meta.get("epoch") or 0, "arch": meta["arch"], "state_dict": state, "optimizer": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_out", help="everything goes under this folder")
    parser.add_argument("--suite", default="demo", help="protocol suite for cgh compare")
    parser.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for both pretrainings (e.g. optim.epochs=2)")
    args = parser.parse_args(argv)

    from reports.cli import make_report
    from reports.compare import compare
    from reports.render import markdown_table

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    t0 = time.perf_counter()
    out = Path(args.output).resolve()
    data_root = synth_data(out / "synthshapes")
    backbones = {name: pretrain_variant(name, data_root, out / "pretrain" / name, args.pretrain_override)
                 for name in VARIANTS}
    checkpoints = [backbones["cgh"], backbones["ressl"], random_init(out / "checkpoints" / "random_init.safetensors"),
                   moco_layout(backbones["cgh"], out / "checkpoints" / "cgh_moco_layout.pth.tar")]
    _log(f"comparing {len(checkpoints)} checkpoints with suite '{args.suite}'")
    outcomes = compare(checkpoints, args.suite, out / "compare", str(data_root), log=_log)
    report, paths = make_report([out / "pretrain", out / "compare" / "runs"], out / "report", "cgh demo report")
    failed = [o for o in outcomes if o.status == "failed"]

    print()
    print(markdown_table(report.summary.display()))
    print()
    for o in failed:
        print(f"FAILED: {o.run} on {Path(o.checkpoint).name}: {o.message}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s "
          f"({sum(o.status == 'ran' for o in outcomes)} runs, {sum(o.status == 'skipped' for o in outcomes)} reused)")
    print(f"report: {paths['markdown']}")
    print(f"html:   {paths['html']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
