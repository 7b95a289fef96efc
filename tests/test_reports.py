"""Reports from hand-made records: collection, paper-shaped tables, references, deltas, outputs."""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

from cgh.cli import main as cgh_main
from reports import plots
from reports.cli import make_report
from reports.collect import collect
from reports.tables import (PAPER_TABLES, build_table, checkpoint_labels, paper_tables, ranking_tables,
                            reference, summary_table)
from _helpers_reports import CGH_TRAIN, RESSL_TRAIN, RecordWriter, checkpoint, full_demo_like

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "cgh-wacv2024.md"


def spec(key: str):
    return next(s for s in PAPER_TABLES if s.key == key)


def row(frame: pd.DataFrame, method: str, setting: str | None = None) -> pd.Series:
    rows = frame[frame["Method"] == method]
    if setting is not None:
        rows = rows[rows["Ours setting"].str.contains(setting, regex=False)]
    assert len(rows) == 1, f"{len(rows)} rows for {method!r}"
    return rows.iloc[0]


# ------------------------------------------------------------------------------------- collection

def test_collect_reports_broken_and_foreign_json_and_keeps_the_rest(tmp_path, capsys):
    w = RecordWriter(tmp_path / "results")
    good = w("knn", {"top1": 50.0, "top5": 80.0}, checkpoint("a"))
    (tmp_path / "results" / "broken").mkdir()
    (tmp_path / "results" / "broken" / "result.json").write_text('{"protocol": "knn", ')     # truncated
    (tmp_path / "results" / "foreign").mkdir()
    (tmp_path / "results" / "foreign" / "result.json").write_text(json.dumps({"accuracy": 0.9}))
    (tmp_path / "results" / "binary").mkdir()
    (tmp_path / "results" / "binary" / "result.json").write_bytes(b"\x89PNG\x00\xff")
    bad_metric = json.loads(good.read_text())
    bad_metric["metrics"]["top1"] = "high"
    (tmp_path / "results" / "badmetric").mkdir()
    (tmp_path / "results" / "badmetric" / "result.json").write_text(json.dumps(bad_metric))
    (tmp_path / "results" / "notes.json").write_text("{}")          # not named result.json: not a record
    explicit = tmp_path / "other.json"                              # a file given by path is read as given
    explicit.write_text(json.dumps([1, 2]))

    c = collect([tmp_path / "results", explicit])
    assert [r["_path"] for r in c.records] == [str(good.resolve())]
    reasons = {Path(p).parent.name if Path(p).name == "result.json" else Path(p).name: why for p, why in c.skipped}
    assert set(reasons) == {"broken", "foreign", "binary", "badmetric", "other.json"}
    assert "not a readable JSON file" in reasons["broken"]
    assert "lacks 'schema_version'" in reasons["foreign"]
    assert "not a readable JSON file" in reasons["binary"]
    assert "metric 'top1' is not a number" in reasons["badmetric"]
    assert "not a JSON object" in reasons["other.json"]

    rc = cgh_main(["report", str(tmp_path / "results"), str(explicit), "-o", str(tmp_path / "out")])  # not fatal
    assert rc == 0
    assert "1 record(s) read, 5 file(s) skipped" in capsys.readouterr().out
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Skipped 5 file(s)" in md and "badmetric" in md
    assert "Skipped 5 file(s)" in (tmp_path / "out" / "report.html").read_text()


def test_collect_missing_folder_is_a_clear_error(tmp_path):
    from cgh.errors import CghError
    with pytest.raises(CghError, match="results path not found: .*nowhere"):
        collect([tmp_path / "nowhere"])


# -------------------------------------------------------------------------------- reference data

def test_reference_csv_holds_the_papers_numbers_with_provenance():
    ref = reference()
    assert list(ref.columns[:6]) == ["table", "row", "method", "column", "dataset", "value"]
    assert ref["source"].str.match(r"cgh-wacv2024\.md line \d+$").all()

    def value(table, method, column, dataset=None):
        sel = ref[(ref.table == table) & (ref.method == method) & (ref.column == column)]
        if dataset:
            sel = sel[sel.dataset == dataset]
        assert len(sel) == 1
        return sel.iloc[0]["value"]

    # typed from the paper's Tables 3-7 for this test, independently of the CSV
    assert value("table3", "CGH", "semi1_top1") == 53.2 and value("table3", "CGH", "semi10_top5") == 88.0
    assert value("table3", "SwAV", "semi10_top1") == 70.2
    assert math.isnan(value("table3", "ReSSL (Multi)", "semi1_top5"))          # printed "-" in the paper
    assert value("table4", "ReSSL", "AP") == 56.1 and value("table4", "CGH (Multi)", "AP75") == 63.8
    assert value("table5", "same-context", "linear_top1", "STL-10") == 91.0
    assert value("table6", "0.06", "linear_top1") == 53.1
    assert value("table7", "layer2+layer4", "linear_top1", "Tiny-ImageNet") == 54.1
    assert value("table1", "CGH", "linear_top1") == 70.5 and value("table1", "CGH", "knn_top1") == 62.9
    assert value("table1", "MoCo-v2", "knn_top1") == 55.9 and value("table1", "CGH-pred", "knn_top1") == 65.8
    assert math.isnan(value("table1", "BYOL", "knn_top1"))                    # printed "-" in the paper
    assert (ref.table == "table1").sum() == 14 * 2                             # linear and kNN top-1 per row
    table2 = ref[(ref.table == "table2") & (ref.method == "CGH-pred")].sort_values("epochs")
    assert list(table2["value"]) == [75.7, 76.0] and list(table2["epochs"]) == [200, 400]
    assert set(ref[ref.table == "table3"]["epochs"].dropna()) == {200, 800, 1000}


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper's text is not next to this checkout")
def test_reference_csv_matches_the_paper_text_line_by_line():
    """Every number in the CSV is on the line its provenance names, in the same order."""
    lines = PAPER.read_text(encoding="utf-8").splitlines()
    ref = reference()
    numbered = ref[ref["value"].notna()]
    for source, group in numbered.groupby("source", sort=False):
        line = lines[int(source.rsplit(" ", 1)[1]) - 1]
        text = re.sub(r"</?b>", "", line)
        printed = [float(x) for x in re.findall(r"(?<![\w.\[])\d+\.\d+", text)]
        ours = [float(v) for v in group["value"]]
        assert printed[-len(ours):] == ours or printed == ours, (source, printed, ours)
        for label in group["row"].unique():
            if group["table"].iloc[0] in ("table3", "table4", "table5"):
                assert label.split(" [")[0].split(" (")[0] in text, (source, label)


# ------------------------------------------------------------------------------------ paper tables

def test_table3_places_runs_beside_the_paper_with_deltas_and_mean_std_count(tmp_path):
    w = RecordWriter(tmp_path)
    cgh_a = checkpoint("cgh_seed0", train=CGH_TRAIN)
    cgh_b = checkpoint("cgh_seed1", train=CGH_TRAIN)          # same settings: aggregated with seed 0
    w("semi", {"top1": 50.0, "top5": 70.0}, cgh_a, subset="1percent")
    w("semi", {"top1": 52.0, "top5": 74.0}, cgh_b, subset="1percent")
    w("semi", {"top1": 60.0, "top5": 80.0}, cgh_a, subset="10percent")
    w("semi", {"top1": 40.0, "top5": 65.0}, checkpoint("ressl", "ressl", train=RESSL_TRAIN), subset="1percent")
    w("semi", {"top1": 10.0, "top5": 30.0}, checkpoint("random_init", "random-init"), subset="1percent")
    w("knn", {"top1": 99.0, "top5": 99.0}, cgh_a)              # other protocols stay out of Table 3

    table = build_table(spec("table3"), collect([tmp_path]).records)
    frame, shown = table.frame(), table.display()
    assert len(frame) == 9 + 1                                 # the paper's 9 rows + our random init
    assert frame.shape[1] == 3 + 4 * 5 and shown.shape == (10, 3 + 4 * 3)
    assert list(frame["Method"][:3]) == ["MoCo-v2 [8]*", "HCSC [17]", "ReSSL [49]†"]

    cgh = row(frame, "CGH")
    assert cgh["1% top-1 paper"] == 53.2 and cgh["1% top-1 ours"] == 51.0
    assert cgh["1% top-1 ours std"] == pytest.approx(statistics.stdev([50.0, 52.0]))
    assert cgh["1% top-1 ours n"] == 2
    assert cgh["1% top-1 Δ"] == pytest.approx(51.0 - 53.2)
    assert cgh["1% top-5 Δ"] == pytest.approx(72.0 - 78.9)
    assert cgh["10% top-1 ours"] == 60.0 and cgh["10% top-1 ours n"] == 1
    assert cgh["10% top-1 Δ"] == pytest.approx(60.0 - 66.4)
    assert "synthshapes · ResNet-18 · 8 ep" in cgh["Ours setting"]
    assert cgh["Paper setting"] == "IN-1K · ResNet-50 · 200 ep · bs 256"

    ressl = row(frame, "ReSSL [49]†")                          # global-context run = the ReSSL row
    assert ressl["1% top-1 ours"] == 40.0 and ressl["1% top-1 Δ"] == pytest.approx(40.0 - 51.1)
    assert math.isnan(ressl["10% top-1 ours"]) and ressl["10% top-1 ours n"] == 0

    shown_cgh = shown[shown["Method"] == "CGH"].iloc[0]
    assert shown_cgh["1% top-1 ours"] == "51.0 ± 1.4 (2)"
    assert shown_cgh["1% top-1 Δ"] == "-2.2" and shown_cgh["10% top-1 Δ"] == "-6.4"
    assert shown_cgh["10% top-5 ours"] == "80.0" and shown_cgh["10% top-5 paper"] == "88.0"
    shown_ressl = shown[shown["Method"] == "ReSSL [49]†"].iloc[0]
    assert shown_ressl["10% top-5 ours"] == "-" and shown_ressl["10% top-5 Δ"] == "-"
    multi = shown[shown["Method"] == "ReSSL (Multi) [49]"].iloc[0]
    assert multi["1% top-5 paper"] == "-" and multi["1% top-1 paper"] == "57.9" and multi["Ours setting"] == "-"
    rnd = shown[shown["Method"] == "Random init"].iloc[0]   # not in the paper: appended, paper cells dashed
    assert rnd["1% top-1 ours"] == "10.0" and rnd["1% top-1 paper"] == "-" and rnd["1% top-1 Δ"] == "-"
    assert "random_init" in rnd["Ours setting"] and "no training config" in rnd["Ours setting"]


def test_table4_counts_the_seeds_inside_one_record(tmp_path):
    w = RecordWriter(tmp_path)
    runs = [{"AP": 10.0, "AP50": 20.0, "AP75": 5.0}, {"AP": 14.0, "AP50": 26.0, "AP75": 7.0},
            {"AP": 12.0, "AP50": 23.0, "AP75": 6.0}]
    w("voc_det", {"AP": 12.0, "AP50": 23.0, "AP75": 6.0, "AP_std": 2.0}, checkpoint("cgh", train=CGH_TRAIN),
      dataset="synthshapes_voc", extra={"runs": runs})
    frame = build_table(spec("table4"), collect([tmp_path]).records).frame()
    cgh = row(frame, "CGH")
    assert cgh["AP ours n"] == 3 and cgh["AP ours"] == pytest.approx(12.0)
    assert cgh["AP50 ours std"] == pytest.approx(statistics.stdev([20.0, 26.0, 23.0]))
    assert cgh["AP75 Δ"] == pytest.approx(6.0 - 63.4)
    assert "eval synthshapes_voc" in cgh["Ours setting"]
    assert len(frame) == 8                                      # every paper row stays


def test_table1_prefers_the_full_linear_probe_and_marks_the_fast_one(tmp_path):
    w = RecordWriter(tmp_path)
    cgh = checkpoint("cgh", train=CGH_TRAIN)
    ressl = checkpoint("ressl", "ressl", train=RESSL_TRAIN)
    w("linear", {"top1": 70.0, "top5": 90.0}, cgh)
    w("linear_fast", {"top1": 65.0, "top5": 88.0}, cgh)
    w("linear_fast", {"top1": 60.0, "top5": 85.0}, ressl)
    w("knn", {"top1": 55.0, "top5": 80.0}, cgh)
    w("linear", {"top1": 75.0, "top5": 93.0}, checkpoint("cgh_multi", train={**CGH_TRAIN, "multi_crop": True}))
    tables = {t.key: t.frame() for t in paper_tables(collect([tmp_path]).records)}
    t1 = tables["table1"]
    assert row(t1, "CGH")["Linear top-1 ours"] == 70.0 and row(t1, "CGH")["kNN top-1 ours"] == 55.0
    assert "fast linear probe" not in row(t1, "CGH")["Ours setting"]
    assert row(t1, "ReSSL [49]†")["Linear top-1 ours"] == 60.0
    assert "fast linear probe" in row(t1, "ReSSL [49]†")["Ours setting"]
    assert not t1["Ours setting"].str.contains("Multi").any() and len(t1) == 14     # multi-crop: Table 2 only
    t2 = tables["table2"]
    assert row(t2, "CGH (Multi)")["Linear top-1 ours"] == 75.0               # no CGH (plain) row in Table 2
    assert len(t2) == 12


def test_ablation_tables_place_runs_by_variant_and_dataset(tmp_path):
    w = RecordWriter(tmp_path)
    def ck(name, **train):
        return checkpoint(name, train={**CGH_TRAIN, **train})
    w("linear", {"top1": 50.0, "top5": 0.0}, ck("cross"))
    w("linear", {"top1": 44.0, "top5": 0.0}, ck("glob", method="ressl", loss_mode="global"))
    w("linear", {"top1": 47.0, "top5": 0.0}, ck("same", loss_mode="same"))
    w("linear", {"top1": 55.0, "top5": 0.0}, ck("tiny", dataset="tiny-imagenet"), dataset="tiny_imagenet")
    w("linear", {"top1": 49.0, "top5": 0.0}, ck("tau05", tau_h=0.05))
    w("linear", {"top1": 48.0, "top5": 0.0}, ck("tau02", tau_h=0.02))
    w("linear", {"top1": 51.0, "top5": 0.0}, ck("l24", layers=["layer2", "layer4"]))
    w("linear", {"top1": 52.0, "top5": 0.0}, ck("l134", layers=["layer1", "layer3", "layer4"]))
    tables = {t.key: t for t in paper_tables(collect([tmp_path]).records)}

    t5 = tables["table5"].frame()
    assert tables["table5"].value_columns == ["Tiny-ImageNet", "STL-10", "synthshapes"]
    cross = t5[t5["Method"] == "CGH (cross-context)"]
    assert len(cross) == 2                                      # synthshapes run and Tiny-ImageNet run
    tiny = cross[cross["Tiny-ImageNet ours n"] == 1].iloc[0]
    assert tiny["Tiny-ImageNet ours"] == 55.0 and tiny["Tiny-ImageNet Δ"] == pytest.approx(55.0 - 53.8)
    synth = cross[cross["synthshapes ours n"] == 1].iloc[0]
    assert synth["synthshapes ours"] == 50.0 and math.isnan(synth["synthshapes Δ"])
    assert math.isnan(synth["synthshapes paper"]) and synth["Tiny-ImageNet paper"] == 53.8
    assert row(t5, "CGH (global-context)")["synthshapes ours"] == 44.0
    assert row(t5, "CGH (same-context)")["synthshapes ours"] == 47.0
    assert len(t5) == 4                                         # tau/layer variants are not context variants

    t6 = tables["table6"].frame()
    assert row(t6, "τ_h = 0.02")["Tiny-ImageNet ours"] == 48.0
    assert row(t6, "τ_h = 0.02")["Tiny-ImageNet Δ"] == pytest.approx(48.0 - 52.1)
    assert row(t6, "τ_h = 0.05")["Tiny-ImageNet ours"] == 49.0              # not in the paper: appended
    assert math.isnan(row(t6, "τ_h = 0.05")["Tiny-ImageNet paper"])
    assert len(t6[t6["Method"] == "τ_h = 0.08"]) == 2                       # synthshapes + tiny runs
    assert len(t6) == 5 + 1 + 1

    t7 = tables["table7"].frame()
    assert row(t7, "L2+L4")["synthshapes ours"] == 51.0
    assert row(t7, "L4")["synthshapes ours"] == 44.0                        # ReSSL = hypercolumn of L4
    assert row(t7, "L1+L3+L4")["synthshapes ours"] == 52.0
    assert row(t7, "L1+L2+L3+L4")["STL-10 paper"] == 92.3

    t1 = tables["table1"].frame()                                            # variants don't pollute "CGH"
    cgh = t1[t1["Method"] == "CGH"]
    assert sorted(cgh["Linear top-1 ours"]) == [50.0, 55.0]
    assert {"CGH (τ_h=0.05)", "CGH (L2+L4)", "CGH (same-context)"} <= set(t1["Method"])


# ----------------------------------------------------------------------------- comparisons, output

def test_ranking_and_summary_aggregate_per_checkpoint(tmp_path):
    w = RecordWriter(tmp_path)
    a = checkpoint("backbone", train=CGH_TRAIN, folder="cgh")
    b = checkpoint("backbone", "ressl", train=RESSL_TRAIN, folder="ressl")      # same file name, other folder
    c = checkpoint("random_init", "random-init")
    w("knn", {"top1": 60.0, "top5": 80.0, "best_k": 20}, a)
    w("knn", {"top1": 64.0, "top5": 84.0, "best_k": 20}, a)                   # duplicate run: mean ± std (2)
    w("knn", {"top1": 70.0, "top5": 85.0, "best_k": 10}, b)
    w("knn", {"top1": 20.0, "top5": 50.0, "best_k": 10}, c)
    w("linear_fast", {"top1": 30.0, "top5": 60.0}, c)
    recs = collect([tmp_path]).records
    labels = checkpoint_labels(recs)
    assert sorted(labels.values()) == ["cgh/backbone", "random_init", "ressl/backbone"]

    rankings = {t.key: t for t in ranking_tables(recs)}
    assert set(rankings) == {"rank_knn_synthshapes", "rank_linear_fast_synthshapes"}
    knn = rankings["rank_knn_synthshapes"].display()
    assert list(knn["Checkpoint"]) == ["ressl/backbone", "cgh/backbone", "random_init"]
    assert list(knn["Rank"]) == ["1", "2", "3"]
    assert knn.iloc[1]["top1"] == "62.0 ± 2.8 (2)"

    summary = summary_table(recs).display()
    assert list(summary.columns) == ["Checkpoint", "Method", "kNN on synthshapes: top1",
                                     "Linear probe (fast, cached features) on synthshapes: top1"]
    assert summary.set_index("Checkpoint").loc["cgh/backbone", "Linear probe (fast, cached features) on synthshapes: top1"] == "-"
    assert summary.set_index("Checkpoint").loc["random_init", "kNN on synthshapes: top1"] == "20.0"


def test_write_report_outputs_markdown_csv_latex_html_and_plots(tmp_path):
    full_demo_like(tmp_path / "results")
    report, paths = make_report([tmp_path / "results"], tmp_path / "out", "test report")
    tables = report.tables
    assert {t.key for t in tables} >= {"summary", "table1", "table2", "table3", "table4", "coco", "seg",
                                       "table5", "table6", "table7", "rank_knn_synthshapes"}
    for t in tables:
        csv = pd.read_csv(paths["tables"] / f"{t.key}.csv", na_values="-", keep_default_na=False)
        frame = t.frame()
        assert list(csv.columns) == list(frame.columns)
        numeric = [c for c in frame.columns if c not in t.label_columns]
        pd.testing.assert_frame_equal(csv[numeric].astype(float), frame[numeric].astype(float).round(6),
                                      check_dtype=False)
        tex = (paths["tables"] / f"{t.key}.tex").read_text()
        assert "\\begin{tabular}" in tex and "\\bottomrule" in tex
        assert tex.count("\\\\") == len(t.rows) + 1 + (0 if t.rows else 1)
    tex3 = (paths["tables"] / "table3.tex").read_text()
    assert "1\\% top-1" in tex3 and "$\\Delta$" in tex3 and "ReSSL [49]$^\\dagger$" in tex3

    md = paths["markdown"].read_text()
    for t in tables:
        assert f"## {t.title}" in md
    assert md.count("| --- |") >= len([t for t in tables if t.rows])
    assert "| CGH | IN-1K · ResNet-50 · 200 ep · bs 256 | synthshapes · ResNet-18 · 8 ep | 53.2 | 50.0 | -3.2 |" in md
    assert set(report.plots) == {"training_curves", "knn_vs_k", "positive_selection"}
    # the comparison view: a small plot per evaluation (kNN, fast linear, semi 1 % / 10 %, VOC, COCO, seg)
    assert [title for title, _ in report.comparison_plots.values()] == report.summary.value_columns
    assert len(report.comparison_plots) == 7
    for name in {**report.plots, **report.comparison_plots}:
        png = (paths["plots"] / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}.png" in md
    html = paths["html"].read_text()
    assert html.count("<img ") == 10 and html.count("data:image/png;base64,") == 10
    assert html.count('<table class="report') == len([t for t in tables if t.rows])
    assert html.index('<section id="comparison">') < html.index("<h1>Paper tables</h1>")
    assert "src=\"http" not in html and "<link" not in html                  # self-contained


def test_plots_are_skipped_without_data_and_drawn_from_records(tmp_path):
    assert plots.all_plots([]) == {}
    w = RecordWriter(tmp_path)
    w("knn", {"top1": 50.0, "top5": 80.0, "top1_k10": 48.0, "top1_k20": 50.0}, checkpoint("a"))
    recs = collect([tmp_path]).records
    out = plots.all_plots(recs)
    assert set(out) == {"knn_vs_k"}                                         # no pretraining record: no curves
    assert out["knn_vs_k"][1][:4] == b"\x89PNG"


def test_training_curves_show_the_queue_rank_when_logged(tmp_path):
    """The collapse check of the pretraining monitor gets its own panel, with the logged values;
    records from before it was logged keep the two-panel figure."""
    from _helpers_reports import pretrain_history

    w = RecordWriter(tmp_path / "with")
    hist = [dict(h, queue_rank_global=100.0 / h["epoch"], queue_rank_hyper=80.0 - h["epoch"])
            for h in pretrain_history()]
    w("pretrain", {"loss": 2.0, "knn_top1": 40.0}, checkpoint("cgh", train=CGH_TRAIN), extra={"history": hist})
    fig = plots.training_curves_figure(collect([tmp_path / "with"]).records)
    axes = fig.get_axes()
    assert len(axes) == 3 and "effective rank" in axes[2].get_title()
    drawn = {line.get_label().rsplit(": ", 1)[-1]: list(line.get_ydata()) for line in axes[2].get_lines()}
    assert drawn == {"global": [h["queue_rank_global"] for h in hist], "hyper": [h["queue_rank_hyper"] for h in hist]}

    w = RecordWriter(tmp_path / "without")
    w("pretrain", {"loss": 2.0, "knn_top1": 40.0}, checkpoint("cgh", train=CGH_TRAIN),
      extra={"history": pretrain_history()})
    assert len(plots.training_curves_figure(collect([tmp_path / "without"]).records).get_axes()) == 2
