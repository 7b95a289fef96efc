"""Records are untrusted input: a bad ``result.json`` is skipped with its reason, never crashes or hangs a
report, never counts twice, and names from records reach no output raw. Records are written as strict
JSON, and a report set is replaced as a whole or not at all."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cgh.cli import main as cgh_main
from cgh.errors import CghError
from cgh.records import NAME_LIMIT, RecordError, read_record, write_record
from reports import plots, render
from reports.cli import make_report
from reports.collect import collect
from _helpers_reports import RecordWriter, checkpoint

EVIL = "<script>alert(1)\x1b[31mred|pipe`tick"       # raw HTML, an ANSI colour code, a pipe, a backtick
MATH = "$\\frac{a}{b}$"                                # matplotlib would parse this as math text
BROKEN_MATH = "a $x^$ b"                               # ... and fail on this one (ValueError)
LONG_DATASET = "d" * 300


def _good(root: Path) -> Path:
    """The one valid record every case sits beside: kNN top-1 50.0 of checkpoint "good"."""
    return RecordWriter(root)("knn", {"top1": 50.0, "top5": 80.0, "best_k": 20}, checkpoint("good"))


def _edited(good: Path, folder: Path, edit) -> None:
    rec = json.loads(good.read_text())
    edit(rec)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(rec))


def _set(path: str, value):
    def edit(rec):
        *parents, last = path.split(".")
        block = rec
        for key in parents:
            block = block[key]
        block[last] = value
    return edit


# case -> (how to make it next to the good record, a phrase of the reason it is skipped for)
BAD = {
    "truncated": (lambda good, d: (d.mkdir(), (d / "result.json").write_text(good.read_text()[:200])),
                  "not a readable JSON file"),
    "deep": (lambda good, d: (d.mkdir(), (d / "result.json").write_text("[" * 100_000 + "]" * 100_000)),
             "nested"),
    "moderately_deep": (lambda good, d: _edited(good, d, _set("extra", {"x": json.loads("[" * 500 + "]" * 500)})),
                        "nested deeper than 32 levels"),
    "huge_metric": (lambda good, d: _edited(good, d, _set("metrics.top1", 1e200)), "beyond the sane bound"),
    "negative_huge_metric": (lambda good, d: _edited(good, d, _set("metrics.top5", -1e200)), "beyond the sane bound"),
    "huge_name": (lambda good, d: _edited(good, d, _set("checkpoint.name", "n" * 200_000)),
                  "string of 200000 characters"),
    "fifo": (lambda good, d: (d.mkdir(), os.mkfifo(d / "result.json")), "not a regular file (a FIFO)"),
    "dev_zero": (lambda good, d: (d.mkdir(), (d / "result.json").symlink_to("/dev/zero")),
                 "not a regular file (a character device)"),
    "schema_0": (lambda good, d: _edited(good, d, _set("schema_version", 0)), "schema_version 0 is not one"),
    "schema_-7": (lambda good, d: _edited(good, d, _set("schema_version", -7)), "schema_version -7 is not one"),
    "run001_copy": (lambda good, d: shutil.copytree(good.parent, d), "duplicate of "),   # after run001
}


def _cell(report, checkpoint_label: str, column: str = "kNN on synthshapes: top1") -> str:
    shown = report.summary.display().set_index("Checkpoint")
    return shown.loc[checkpoint_label, column]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", [c for c in BAD if c != "truncated"])   # truncated: see test_reports.py
def test_a_bad_record_is_skipped_with_its_reason(tmp_path, case):
    make, reason = BAD[case]
    good = _good(tmp_path / "results")
    make(good, tmp_path / "results" / case)
    c = collect([tmp_path / "results"])
    assert [r["_path"] for r in c.records] == [str(good)]
    assert [Path(p).parent.name for p, _ in c.skipped] == [case]
    assert reason in c.skipped[0][1] and "\n" not in c.skipped[0][1] and len(c.skipped[0][1]) < 400
    if case == "run001_copy":
        assert str(good) in c.skipped[0][1]         # names the copy it repeats


@pytest.mark.timeout(60)
def test_report_from_every_bad_record_at_once_builds_fast_and_lists_each(tmp_path, capsys):
    """The good record's number stands alone (the duplicate adds no run), every bad file is listed with
    why, odd names are shown escaped and cut, and the CLI's terminal output holds no raw name."""
    results = tmp_path / "results"
    good = _good(results)
    for case, (make, _) in BAD.items():
        make(good, results / case)
    w = RecordWriter(results / "odd")
    w("knn", {"top1": 40.0, "top5": 70.0, "top1_k10": 40.0}, checkpoint(MATH))      # plotted: legend labels
    w("knn", {"top1": 35.0, "top5": 65.0, "top1_k10": 35.0}, checkpoint(BROKEN_MATH))
    w("knn", {"top1": 30.0, "top5": 60.0, "top1_k10": 30.0}, checkpoint("longds"), dataset=LONG_DATASET)
    w("knn", {"top1": 20.0, "top5": 50.0, "top1_k10": 20.0}, checkpoint(EVIL, method=EVIL))

    rc = cgh_main(["report", str(results), "-o", str(tmp_path / "out")])
    terminal = capsys.readouterr().out
    assert rc == 0
    report, paths = make_report([results], tmp_path / "out2")
    c = report.collection

    skipped = {Path(p).parent.name: why for p, why in c.skipped}
    assert set(skipped) == set(BAD)
    for case, (_, reason) in BAD.items():
        assert reason in skipped[case], case
    assert _cell(report, "good") == "50.0"                      # n = 1: not "50.0 ± 0.0 (2)"
    assert len(c.records) == 5
    assert f"5 record(s) read, {len(BAD)} file(s) skipped" in terminal

    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    for text in (md, html):
        assert f"Skipped {len(BAD)} file(s)" in text
        assert "<script>" not in text and "\x1b" not in text
        assert "&lt;script&gt;alert(1)" in text
    assert "red\\|pipe\\`tick" in md                            # table cell intact, not split at the pipe
    assert "\x1b" not in terminal and "<script>" not in terminal
    assert "&lt;script&gt;alert(1)red\\|pipe" in terminal

    assert MATH in md and _cell(report, MATH) == "40.0"        # shown as written; the plots did not choke
    assert _cell(report, BROKEN_MATH) == "35.0"
    assert "knn_vs_k" in report.plots                          # drawn with every checkpoint's name
    assert [t for t, _ in report.comparison_plots.values()] == report.summary.value_columns
    assert plots.plot_text(MATH) == "\\$\\frac{a}{b}\\$"       # plain text to matplotlib, never math
    cut = "d" * (NAME_LIMIT - 1) + "…"
    assert LONG_DATASET not in md and f"kNN on {cut}" in md
    long_rank = next(t for t in report.rankings if LONG_DATASET[:50] in t.key)
    assert len(long_rank.key) <= 100
    assert "\\ldots{}" in (paths["tables"] / f"{long_rank.key}.tex").read_text()


# ------------------------------------------------------------------------------------ writing records

def _write(out: Path, config: dict, metrics: dict | None = None, extra: dict | None = None) -> Path:
    return write_record(out, protocol="knn", checkpoint=checkpoint("a"), dataset={"name": "synthshapes", "split": "val"},
                        metrics=metrics or {"top1": 50.0}, config=config, started="2024-01-01T00:00:00+00:00",
                        wall_time_s=1.0, extra=extra)


def test_write_record_refuses_a_non_finite_config_value_and_writes_nothing(tmp_path):
    with pytest.raises(RecordError, match=r"'config\.knn\.temperature' is nan"):
        _write(tmp_path / "run", {"knn": {"temperature": float("nan"), "k": [10, 20]}})
    with pytest.raises(RecordError, match=r"'config\.ks\[1\]' is inf"):
        _write(tmp_path / "run", {"ks": [1.0, float("inf")]})
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_write_record_writes_strict_json_undefined_numbers_as_null(tmp_path):
    """A metric or a history value that could not be computed (precision with no positives) is null,
    never a bare NaN that strict JSON parsers reject."""
    path = _write(tmp_path / "run", {"k": 20}, metrics={"top1": float("nan"), "top5": 80.0},
                  extra={"history": [{"epoch": 1, "pos_precision": float("nan"), "loss": float("-inf")}]})

    def strict(token):
        raise AssertionError(f"bare {token} in result.json")

    rec = json.loads(path.read_text(), parse_constant=strict)
    assert rec["metrics"] == {"top1": None, "top5": 80.0}
    assert rec["extra"]["history"] == [{"epoch": 1, "pos_precision": None, "loss": None}]
    assert read_record(path)["metrics"]["top5"] == 80.0


# ------------------------------------------------------------------------------------ report as a unit

def _report_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.timeout(120)
def test_a_report_write_that_fails_midway_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    w = RecordWriter(tmp_path / "results")
    w("knn", {"top1": 50.0, "top5": 80.0}, checkpoint("a"))
    out = tmp_path / "out"
    make_report([tmp_path / "results"], out)
    before = _report_files(out)
    w("linear_fast", {"top1": 60.0, "top5": 85.0}, checkpoint("a"))     # the next report differs

    def broken_html(report):
        raise RuntimeError("HTML writer failed")

    with monkeypatch.context() as m:
        m.setattr(render, "to_html", broken_html)
        with pytest.raises(RuntimeError, match="HTML writer failed"):
            make_report([tmp_path / "results"], out)
    assert _report_files(out) == before

    (out / "tables" / "rank_linear_fast_synthshapes.csv").mkdir()        # a folder where a new file goes
    with pytest.raises(CghError, match="is a folder; no report file was replaced"):
        make_report([tmp_path / "results"], out)
    assert _report_files(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []   # no staging left behind

    (out / "tables" / "rank_linear_fast_synthshapes.csv").rmdir()
    make_report([tmp_path / "results"], out)
    after = _report_files(out)
    assert after["report.md"] != before["report.md"] and after["report.html"] != before["report.html"]
    assert "tables/rank_linear_fast_synthshapes.csv" in after
