"""Semi-supervised fine-tuning: trains on exactly the listed images with the recipe's two learning
rates, fine-tunes the backbone, ships both recipes as configs, and fails clearly on bad lists."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from cgh.config import load_config
from cgh.errors import DatasetError
from cgh.records import read_record
from eval import semi
from eval.training import step_factor
from _helpers_eval import knn_cfg, synth_cls_root  # noqa: F401  (fixture)

SMALL = dict(epochs=1, batch_size=10, resize=32, crop=32, milestones="[30,40]")


def listed(root, name):
    return (root / "classification" / "subsets" / f"{name}.txt").read_text().split()


def test_step_schedule_by_hand():
    assert [step_factor(e, [30, 40]) for e in (0, 29, 30, 39, 40, 49)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_uses_exactly_the_listed_images(synth_cls_root, random_ckpt, tmp_path, monkeypatch):
    seen = {}
    real_fit = semi.fit

    def spy(model, train_ds, **kw):
        seen["files"] = [os.path.basename(train_ds.dataset.samples[i][0]) for i in train_ds.indices]
        seen["lrs"] = [g["lr"] for g in kw["optimizer"].param_groups]
        return real_fit(model, train_ds, **kw)
    monkeypatch.setattr(semi, "fit", spy)
    cfg = knn_cfg(semi, random_ckpt, synth_cls_root, tmp_path / "s", subset="10percent",
                  backbone_lr=0.01, head_lr=0.1, **SMALL)
    rec = read_record(semi.run(cfg))
    names = listed(synth_cls_root, "10percent")
    assert sorted(seen["files"]) == sorted(names) and len(seen["files"]) == len(names) == 30
    assert seen["lrs"] == [0.01, 0.1]                  # backbone group, head group
    assert rec["protocol"] == "semi" and rec["dataset"]["subset"] == "10percent"
    assert rec["extra"]["num_labelled"] == 30
    assert rec["extra"]["labelled_files_sha256"] == semi.names_sha256(names)
    assert 0 <= rec["metrics"]["top1"] <= rec["metrics"]["top5"] <= 100
    # The whole network was fine-tuned, not just the head.
    start = load_file(str(random_ckpt))["layer1.0.conv1.weight"]
    tuned = torch.load(tmp_path / "s" / semi.STATE_NAME, weights_only=True)["model"]["0.layer1.0.conv1.weight"]
    assert not torch.equal(start, tuned)


def test_any_subset_file(synth_cls_root, random_ckpt, tmp_path, monkeypatch):
    train = synth_cls_root / "classification" / "train"
    picked = sorted(f.name for d in sorted(train.iterdir()) for f in sorted(d.iterdir())[:2])
    lst = tmp_path / "mine.txt"
    lst.write_text("\n".join(picked) + "\n")
    # selection only: skip training and its per-epoch scoring
    monkeypatch.setattr(semi, "fit", lambda *a, **k: [{"epoch": 1, "loss": 1.0, "lr": 0.1, "top1": 0.0, "top5": 0.0}])
    rec = read_record(semi.run(knn_cfg(semi, random_ckpt, synth_cls_root, tmp_path / "m", subset=str(lst),
                                       **SMALL)))
    assert rec["dataset"]["subset"] == "mine.txt"
    assert rec["extra"]["num_labelled"] == 20
    assert rec["extra"]["labelled_files_sha256"] == semi.names_sha256(picked)


def test_bad_lists_fail_clearly(synth_cls_root, random_ckpt, tmp_path):
    with pytest.raises(DatasetError, match="subset file not found.*nope.txt"):
        semi.run(knn_cfg(semi, random_ckpt, synth_cls_root, tmp_path / "o", subset=str(tmp_path / "nope.txt")))
    lst = tmp_path / "foreign.txt"
    lst.write_text("circle_00000.png\nn01440764_10026.JPEG\nn01440764_10027.JPEG\n")
    with pytest.raises(DatasetError, match="2 of 3 subset images.*n01440764_10026.JPEG"):
        semi.run(knn_cfg(semi, random_ckpt, synth_cls_root, tmp_path / "o", subset=str(lst)))


@pytest.mark.parametrize("pct,head_lr,backbone_lr", [(1, 0.5, 0.0001), (10, 0.2, 0.0002)])
def test_recipe_configs(pct, head_lr, backbone_lr):
    paper = load_config(semi.Config, f"eval/semi_{pct}pct_paper", ["checkpoint=x", "output_dir=y", "data_root=z"])
    assert (paper.recipe, paper.epochs, list(paper.milestones)) == ("paper", 50, [30, 40])
    assert (paper.head_lr, paper.backbone_lr, paper.weight_decay) == (head_lr, backbone_lr, 0.0)
    assert paper.subset == f"{pct}percent" and paper.batch_size == 256
    authors = load_config(semi.Config, f"eval/semi_{pct}pct_authors", ["checkpoint=x", "output_dir=y", "data_root=z"])
    assert (authors.recipe, authors.epochs, list(authors.milestones)) == ("authors", 70, [30, 60])
    assert (authors.head_lr, authors.backbone_lr) == (0.02, 0.005)
