"""``cgh runs DIR``: finished runs from their records, claimed folders without one as running or
unfinished, as a table and as JSON."""
from __future__ import annotations

import json

from cgh.cli import main
from cgh.run_folder import claimed_run_folder, run_identity

from _helpers_reports import CGH_TRAIN, RecordWriter, checkpoint


def _runs(tmp_path, capsys, *extra):
    assert main(["runs", str(tmp_path), *extra]) == 0
    return capsys.readouterr().out


def test_runs_lists_records_and_unfinished_folders(tmp_path, capsys):
    w = RecordWriter(tmp_path / "done")
    w("knn", {"top1": 47.25, "top5": 80.0, "best_k": 20}, checkpoint("cgh", train=CGH_TRAIN))
    w("voc_det", {"AP": 12.5, "AP50": 30.0, "AP75": 8.0}, checkpoint("ressl"), dataset="voc0712",
      extra={"diverged": "loss blew up"})
    ident = run_identity("linear", "ab" * 32, {"epochs": 100})
    with claimed_run_folder(tmp_path / "interrupted", ident):
        pass                                             # claimed, no record: a run that was stopped
    with claimed_run_folder(tmp_path / "live", run_identity("semi", "cd" * 32, {})):
        data = json.loads(_runs(tmp_path, capsys, "--json"))
        text = _runs(tmp_path, capsys)
    runs = {r["folder"].rsplit("/", 1)[-1]: r for r in data["runs"]}
    assert set(runs) == {"run001", "run002", "interrupted", "live"}
    assert runs["run001"]["checkpoint"] == "cgh" and runs["run001"]["protocol"] == "knn"
    assert (runs["run001"]["metric"], runs["run001"]["value"], runs["run001"]["status"]) == ("top1", 47.25, "done")
    assert runs["run001"]["wall_time_s"] == 1.0 and runs["run001"]["started"].startswith("2024-01-01")
    assert runs["run002"]["status"] == "done [diverged]" and runs["run002"]["dataset"] == "voc0712"
    assert runs["interrupted"]["status"] == "unfinished" and runs["interrupted"]["protocol"] == "linear"
    assert runs["interrupted"]["checkpoint"] == "ab" * 6
    assert runs["live"]["status"] == "running"       # its lock is held by the `with` block above
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["checkpoint", "protocol", "dataset", "value"]
    assert any("knn" in l and "top1 47.25" in l and "0:00:01" in l for l in lines)
    assert lines[-1] == "4 run(s): 2 done, 2 not finished; 0 file(s) skipped"
    # once the lock is released the live folder reads as unfinished
    data = json.loads(_runs(tmp_path, capsys, "--json"))
    assert {r["status"] for r in data["runs"] if r["folder"].endswith("live")} == {"unfinished"}


def test_runs_shows_planted_text_display_safe(tmp_path, capsys):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "cgh_run.json").write_text(json.dumps({"protocol": "knn\x1b[31mRED", "checkpoint_sha256": "z"}))
    text = _runs(tmp_path, capsys)
    assert "\x1b" not in text and "unfinished" in text
