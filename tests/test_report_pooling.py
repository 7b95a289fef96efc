"""Reports never mix what differs: only repeats of one evaluation (seeds) are pooled, ties share a
rank, a diverged result is flagged and not ranked, and `cgh compare` ranks only what it was asked."""
from __future__ import annotations

import pandas as pd
import pytest

from cgh.errors import CghError

from reports.cli import make_report
from reports.tables import competition_ranks, eval_settings, ranking_tables, summary_table
from reports.collect import collect
from _helpers_reports import CGH_TRAIN, RecordWriter, checkpoint, epochs


def _knn_config(temperature=0.07, ks=(20,), seed=0, **extra):
    return {"checkpoint": "/somewhere/x.safetensors", "output_dir": f"/runs/knn_{seed}", "dataset": "synthshapes",
            "data_root": f"/data{seed}", "resize": 64, "crop": 64, "batch_size": 128, "num_workers": seed,
            "device": "cpu", "ks": list(ks), "temperature": temperature, "seed": seed, **extra}


def test_eval_settings_ignore_seeds_and_launch_keys_only():
    a = {"config": _knn_config(seed=0)}
    b = {"config": _knn_config(seed=3)}          # other seed, folder, data path, workers: a repeat
    c = {"config": _knn_config(temperature=0.5)}
    assert eval_settings(a) == eval_settings(b)
    assert eval_settings(a) != eval_settings(c) and eval_settings(c)["temperature"] == "0.5"
    nested = {"config": {"detectron2": {"SOLVER": {"MAX_ITER": 3}}, "seeds": 5, "first_seed": 2}}
    assert eval_settings(nested) == {"detectron2.SOLVER.MAX_ITER": "3"}


def test_competition_ranks_share_ties():
    assert competition_ranks([50.0, 60.0, 60.0, None, 40.0]) == [3, 1, 1, None, 4]
    assert competition_ranks([]) == []


def _pooling_records(tmp_path):
    w = RecordWriter(tmp_path)
    ck = checkpoint("cgh", train=CGH_TRAIN)
    w("knn", {"top1": 40.0, "top5": 60.0}, ck, config=_knn_config(seed=0))
    w("knn", {"top1": 42.0, "top5": 62.0}, ck, config=_knn_config(seed=1))
    w("knn", {"top1": 30.0, "top5": 50.0}, ck, config=_knn_config(temperature=0.5, ks=(10,)))
    return collect([tmp_path]).records


def test_runs_with_other_settings_are_separate_rows_not_seeds(tmp_path):
    records = _pooling_records(tmp_path)
    summary = summary_table(records).display()
    cells = sorted(summary.iloc[:, -1])
    assert cells == ["30.0", "41.0 ± 1.4 (2)"], cells            # not "37.3 ± 6.4 (3)"
    names = " ".join(summary["Checkpoint"])
    assert "temperature=0.5" in names and "ks=[10]" in names

    (ranking,) = ranking_tables(records)
    rows = ranking.display()
    assert list(rows["top1"]) == ["41.0 ± 1.4 (2)", "30.0"] and list(rows["Rank"]) == ["1", "2"]
    assert "temperature=0.07" in rows["Setting"][0] and "temperature=0.5" in rows["Setting"][1]

    report, paths = make_report([tmp_path], tmp_path / "report")
    table1 = pd.read_csv(paths["tables"] / "table1.csv", na_values="-", keep_default_na=False)
    ours = table1[table1["kNN top-1 ours n"] > 0]
    assert sorted(ours["kNN top-1 ours"]) == [30.0, 41.0] and sorted(ours["kNN top-1 ours n"]) == [1, 2]


def test_one_run_has_no_std(tmp_path):
    w = RecordWriter(tmp_path)
    w("voc_det", {"AP": 10.0, "AP50": 20.0, "AP75": 5.0}, checkpoint("a"), dataset="voc",
      extra={"runs": [{"AP": 10.0, "AP50": 20.0, "AP75": 5.0}]})
    (ranking,) = ranking_tables(collect([tmp_path]).records)
    frame = ranking.frame()
    assert frame["AP ours n"].tolist() == [1] and frame["AP ours std"].isna().all()
    assert ranking.display()["AP"].tolist() == ["10.0 [1 seed]"]   # no "± std"; the protocol averages 5 runs


def test_diverged_result_is_flagged_and_not_ranked(tmp_path):
    w = RecordWriter(tmp_path)
    w("linear", {"top1": 25.0, "top5": 50.0}, checkpoint("weak"),
      extra={"diverged": "training diverged: the mean loss of epoch 3 is 1e+07", "history": []})
    w("linear", {"top1": 20.0, "top5": 45.0}, checkpoint("fine"))
    records = collect([tmp_path]).records
    rows = ranking_tables(records)[0].display().set_index("Checkpoint")
    assert rows.loc["weak", "Rank"] == "-" and rows.loc["fine", "Rank"] == "1"
    assert rows.loc["weak", "top1"] == "25.0 [diverged]"
    summary = summary_table(records).display().set_index("Checkpoint")
    assert summary.loc["weak"].iloc[-1] == "25.0 [diverged]" and summary.loc["fine"].iloc[-1] == "20.0"
    _, paths = make_report([tmp_path], tmp_path / "report")
    assert "25.0 [diverged]" in paths["markdown"].read_text()


def _table1(results, out, methods=()):
    report, _ = make_report([results], out, methods=methods)
    (table1,) = [t for t in report.paper if t.key == "table1"]
    return table1.display()


def test_a_method_only_the_layout_suggests_is_not_a_paper_row(tmp_path):
    w = RecordWriter(tmp_path / "runs")
    w("linear", epochs(66.0, 87.0),
      {**checkpoint("moco_like", "moco", layout="moco"), "method_source": "layout"})
    rows = _table1(tmp_path / "runs", tmp_path / "r1")
    assert rows[rows["Method"] == "MoCo-v2 [8]"]["Linear top-1 ours"].tolist() == ["-"]
    assert "method unknown (moco layout)" in rows["Method"].tolist()
    # the user says what it is: now it sits in the paper's MoCo-v2 row
    rows = _table1(tmp_path / "runs", tmp_path / "r2", methods=["moco_like=mocov2"])
    assert rows[rows["Method"] == "MoCo-v2 [8]"]["Linear top-1 ours"].tolist() == ["66.0"]
    with pytest.raises(CghError, match="no checkpoint of the results matches"):
        _table1(tmp_path / "runs", tmp_path / "r3", methods=["nothing_like_it=mocov2"])
