"""The ``cgh`` command line: one subcommand per stage of the data flow.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``cgh --help`` stays instant and a missing
optional dependency (detectron2, mmseg) only affects the commands that need it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from cgh.errors import CghError
from cgh.io import disk_full_cause

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("cgh.data.cli", "generate the synthetic benchmark (synthshapes) or check a dataset root"),
    "pretrain": ("cgh.train", "pretrain CGH / ReSSL / variants from a config (CPU, GPU, torchrun)"),
    "inspect": ("transfer.cli_inspect", "detect a checkpoint's layout and list its backbone tensors"),
    "convert": ("transfer.cli_convert", "convert a checkpoint to canonical/torchvision/detectron2/mmseg"),
    "eval": ("eval.cli", "classification protocols: knn, linear, semi"),
    "transfer": ("transfer.cli_transfer", "detection/segmentation transfer: voc, coco, seg"),
    "report": ("reports.cli", "build the paper-shaped report from result.json records"),
    "compare": ("reports.compare", "run a protocol suite on several checkpoints and rank them"),
    "runs": ("reports.runs", "list what has been run under folders: records, and runs not finished"),
}


class _PrintVersion(argparse.Action):
    """``--version``: cgh's version, git commit and main dependencies (looked up only when asked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        from cgh import __version__
        from cgh.records import git_commit

        lines = [f"cgh {__version__} (git {git_commit() or 'unknown'})"]
        for name in ("torch", "torchvision", "detectron2", "mmsegmentation", "mmcv", "mmengine"):
            try:
                lines.append(f"{name} {metadata.version(name)}")
            except metadata.PackageNotFoundError:   # detectron2's offline install has no metadata
                try:
                    lines.append(f"{name} {importlib.import_module(name).__version__}")
                except Exception:
                    lines.append(f"{name} not installed")
        print("\n".join(lines))
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgh", description="Pretrain CGH and evaluate any ResNet checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_PrintVersion,
                        help="print cgh's version, git commit and the versions of its main dependencies")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (CghError, FileNotFoundError) as e:
        print(f"cgh {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C: what was saved stays; the same command resumes from it
        print(f"\ncgh {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as e:   # a full disk under a third-party writer (detectron2, mmengine)
        cause = disk_full_cause(e)
        if cause is None:
            raise
        where = getattr(cause, "filename", None)
        print(f"cgh {args.command}: error: no space left on the device"
              f"{f' to write {where}' if where else ''} ({type(cause).__name__}: {cause})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
