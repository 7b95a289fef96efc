"""`--help` works for every command and subcommand (a stray `%` in a help string once made
`cgh eval --help` crash with a traceback)."""
from __future__ import annotations

import argparse

import pytest

from cgh.cli import COMMANDS, build_parser, main


def _subcommands(command: str) -> list[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
    return list(nested[0].choices) if nested else []


CASES = [[]] + [[c] for c in COMMANDS] + [[c, s] for c in COMMANDS for s in _subcommands(c)]


@pytest.mark.parametrize("argv", CASES, ids=lambda a: " ".join(a) or "cgh")
def test_help_prints_and_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: cgh")
    if len(argv) == 2:
        assert argv[1] in out


def test_version_names_cgh_its_commit_and_dependencies(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("cgh 0.")
    assert "(git " in out and all(f"\n{name} " in out for name in ("torch", "detectron2", "mmsegmentation"))
