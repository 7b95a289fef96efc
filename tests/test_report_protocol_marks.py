"""What the report says about how a number was produced: the linear/semi epoch it shows (best or
last, ``--epoch``), a single detection run where the protocol averages five, bf16 features."""
from __future__ import annotations

import pytest

from cgh.errors import CghError
from reports.collect import choose_epoch, collect
from reports.tables import build_table, format_cell, PAPER_TABLES, ranking_tables

from _helpers_reports import CGH_TRAIN, RecordWriter, checkpoint

LINEAR = {"top1": 61.0, "top5": 80.0, "top1_last": 61.0, "top5_last": 80.0,
          "top1_best": 64.5, "top5_best": 82.0, "best_epoch": 70}


def _records(tmp_path):
    return collect([tmp_path]).records


def _spec(key):
    return next(s for s in PAPER_TABLES if s.key == key)


def _linear_cell(table):
    row = next(r for r in table.rows if r.labels["Ours setting"] != "-")
    return format_cell(row.cells["Linear top-1"])


def test_best_epoch_is_the_default_and_last_is_marked(tmp_path):
    w = RecordWriter(tmp_path)
    w("linear", LINEAR, checkpoint("cgh", train=CGH_TRAIN))
    recs = _records(tmp_path)
    choose_epoch(recs)                                   # default: best, as the authors' scripts
    assert recs[0]["metrics"]["top1"] == 64.5 and recs[0]["metrics"]["top5"] == 82.0
    assert _linear_cell(build_table(_spec("table1"), recs)) == "64.5"

    recs = _records(tmp_path)
    choose_epoch(recs, "last")
    assert recs[0]["metrics"]["top1"] == 61.0
    assert _linear_cell(build_table(_spec("table1"), recs)) == "61.0 [last epoch]"


def test_a_record_without_best_epoch_shows_its_last_epoch_marked(tmp_path):
    w = RecordWriter(tmp_path)
    w("linear", {"top1": 58.0, "top5": 79.0}, checkpoint("old", train=CGH_TRAIN))    # written before tracking
    recs = _records(tmp_path)
    choose_epoch(recs, "best")
    assert recs[0]["metrics"]["top1"] == 58.0
    assert _linear_cell(build_table(_spec("table1"), recs)) == "58.0 [last epoch]"


def test_unknown_epoch_choice_is_refused(tmp_path):
    with pytest.raises(CghError, match="--epoch"):
        choose_epoch([], "median")


def test_single_voc_run_is_marked_and_five_seeds_are_not(tmp_path):
    w = RecordWriter(tmp_path)
    one = [{"AP": 50.0, "AP50": 80.0, "AP75": 55.0}]
    five = [{"AP": 50.0 + i / 10, "AP50": 80.0, "AP75": 55.0} for i in range(5)]
    w("voc_det", one[0], checkpoint("one", train=CGH_TRAIN), dataset="voc07", extra={"runs": one})
    w("voc_det", five[2], checkpoint("five", train={**CGH_TRAIN, "epochs": 9}), dataset="voc07",
      extra={"runs": five})
    table = build_table(_spec("table4"), _records(tmp_path))
    shown = sorted(format_cell(r.cells["AP"]) for r in table.rows if r.labels["Ours setting"] != "-")
    assert shown == ["50.0 [1 seed]", "50.2 ± 0.2 (5)"]
    # a single run is still ranked (it is a result, only a noisier one)
    ranks = ranking_tables(_records(tmp_path))[0]
    assert [r.labels["Rank"] for r in ranks.rows] == ["1", "2"]


def test_bf16_features_are_marked(tmp_path):
    w = RecordWriter(tmp_path)
    w("knn", {"top1": 40.0, "top5": 70.0, "best_k": 20}, checkpoint("fast"), extra={"precision": "bf16"})
    w("knn", {"top1": 40.1, "top5": 70.0, "best_k": 20}, checkpoint("ref"), extra={"precision": "fp32"})
    table = ranking_tables(_records(tmp_path))[0]
    by_name = {r.labels["Checkpoint"]: format_cell(r.cells["top1"]) for r in table.rows}
    assert by_name == {"fast": "40.0 [bf16]", "ref": "40.1"}


def _comparison(tmp_path, **kw):
    from reports.cli import make_report

    report, _ = make_report([tmp_path / "results"], tmp_path / "report", **kw)
    return report.summary.display().set_index("Checkpoint"), report.summary


def _imagenet_runs(tmp_path):
    w = RecordWriter(tmp_path / "results")
    for name, lin, knn in (("mine", 71.0, 60.0), ("theirs", 68.0, 63.9)):
        ck = checkpoint(name)
        w("linear", {**LINEAR, "top1_best": lin, "top1": lin - 1}, ck, dataset="imagenet")
        w("knn", {"top1": knn, "top5": 80.0, "best_k": 20}, ck, dataset="imagenet")


def test_comparison_view_measures_to_the_paper_cgh_row_by_default(tmp_path):
    _imagenet_runs(tmp_path)
    shown, table = _comparison(tmp_path)
    lin, knn = "Linear probe on imagenet: top1", "kNN on imagenet: top1"
    # Table 1 of the paper: CGH 70.5 linear, 62.9 kNN (IN-1K, ResNet-50, 200 epochs)
    assert shown.loc["CGH (paper)", lin] == "70.5 (ref)" and shown.loc["CGH (paper)", knn] == "62.9 (ref)"
    assert shown.loc["mine", lin] == "71.0 (Δ +0.5)" and shown.loc["theirs", knn] == "63.9 (Δ +1.0)"
    rows = [r.labels["Checkpoint"] for r in table.rows]
    assert table.best == {(rows.index("mine"), lin), (rows.index("theirs"), knn)}   # the paper row never wins


def test_comparison_view_reference_checkpoint_and_labels(tmp_path):
    _imagenet_runs(tmp_path)
    shown, _ = _comparison(tmp_path, reference="theirs", labels=["mine=My method", "theirs=Baseline"])
    lin = "Linear probe on imagenet: top1"
    assert shown.loc["Baseline", lin] == "68.0 (ref)" and shown.loc["My method", lin] == "71.0 (Δ +3.0)"
    assert shown.loc["CGH (paper)", lin] == "70.5"
    with pytest.raises(CghError, match="--reference nobody"):
        _comparison(tmp_path, reference="nobody")
    with pytest.raises(CghError, match="--label takes CKPT=NAME"):
        _comparison(tmp_path, labels=["mine"])


def test_a_record_cannot_name_itself(tmp_path):
    """The label key belongs to the report (--label); one planted in a record file is ignored."""
    w = RecordWriter(tmp_path / "results")
    w("knn", {"top1": 50.0, "top5": 80.0, "best_k": 20}, {**checkpoint("planted"), "report_label": "CGH (paper)"})
    shown, _ = _comparison(tmp_path)
    assert list(shown.index) == ["planted"]
