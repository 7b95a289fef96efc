"""Dataset builders, path checks, subset lists and the ``cgh data`` command on small local trees."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers_data import TINY
from cgh.cli import main as cgh_main
from cgh.data import subsets
from cgh.data.datasets import (CorruptImageError, build_classification_dataset, check_coco_root,
                               check_seg_root, check_voc_root, decode_image_tensor, open_image)
from cgh.data.synth import generate
from cgh.errors import DatasetError


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=0, **TINY)
    return out


def _png(path: Path, value: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- classification
def test_synthshapes_and_imagefolder_builders(synth):
    ds = build_classification_dataset("synthshapes", synth, "train")
    assert len(ds.classes) == TINY["num_classes"]
    assert len(ds) == len(ds.targets) == TINY["num_classes"] * TINY["train_per_class"]
    img, target = ds[len(ds) - 1]
    assert img.mode == "RGB" and target == ds.classes.index(Path(ds.samples[-1][0]).parent.name)
    same = build_classification_dataset("imagefolder", synth / "classification", "val")
    assert same.classes == ds.classes and len(same) == TINY["num_classes"] * TINY["val_per_class"]


def test_missing_root_and_split_name_the_expected_path(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nope"))):
        build_classification_dataset("imagenet", tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "val"))):
        build_classification_dataset("imagenet", tmp_path, "val")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="one sub-folder of images per class"):
        build_classification_dataset("imagefolder", tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_classification_dataset("mnist", tmp_path, "train")


def test_tiny_imagenet_layouts(tmp_path):
    # train/<wnid>/images/*.JPEG as shipped; val/ reorganised by class works ...
    for wnid in ("n01443537", "n01629819"):
        for i in range(2):
            _png(tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        _png(tmp_path / "val" / wnid / f"val_{wnid}.JPEG")
    train = build_classification_dataset("tiny-imagenet", tmp_path, "train")
    val = build_classification_dataset("tiny-imagenet", tmp_path, "val")
    assert train.classes == val.classes == ["n01443537", "n01629819"]
    assert train.targets == [0, 0, 1, 1] and val.targets == [0, 1]
    # ... the original val layout is refused with the way to fix it.
    orig = tmp_path / "orig"
    shutil.copytree(tmp_path / "train", orig / "train")
    _png(orig / "val" / "images" / "val_0.JPEG")
    (orig / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01443537\t0\t0\t8\t8\n")
    with pytest.raises(DatasetError, match="val_annotations.txt") as e:
        build_classification_dataset("tiny-imagenet", orig, "val")
    assert "reorganised by class" in str(e.value) and str(orig / "val") in str(e.value)


@pytest.mark.parametrize("name,folder,first", [("cifar10", "cifar-10-batches-py", "data_batch_1"),
                                               ("cifar100", "cifar-100-python", "train"),
                                               ("stl10", "stl10_binary", "train_X.bin")])
def test_torchvision_formats_missing_or_corrupt(tmp_path, name, folder, first):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / folder / first))):
        build_classification_dataset(name, tmp_path, "train")
    # Present but not the real files: torchvision's md5 check fails, reported as a DatasetError.
    files = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"],
             "cifar100": ["train", "meta"], "stl10": ["train_X.bin", "train_y.bin", "class_names.txt"]}[name]
    for f in files:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f).write_bytes(b"not the real file")
    with pytest.raises(DatasetError, match="integrity"):
        build_classification_dataset(name, tmp_path / folder, "train")   # the data folder itself works too


def test_decode_image_tensor_gives_pils_pixels_and_names_corrupt_files(tmp_path):
    """The GPU path's decoder (torchvision.io, PIL for what it cannot read) gives exactly the RGB
    pixels PIL gives, as uint8 [3, H, W]: JPEG (colour and grayscale), PNG with alpha, and TIFF through
    the PIL fallback; broken and missing files fail as ``open_image`` fails, naming the file."""
    rng = np.random.default_rng(0)
    rgb = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((40, 30), Image.BICUBIC))
    files = {"photo.jpg": Image.fromarray(rgb), "gray.jpg": Image.fromarray(rgb[..., 0]),
             "alpha.png": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (30, 40, 1), dtype=np.uint8)])),
             "scan.tiff": Image.fromarray(rgb)}
    for name, image in files.items():
        image.save(tmp_path / name, **({"quality": 90} if name.endswith(".jpg") else {}))
        got = decode_image_tensor(tmp_path / name)
        assert got.dtype == torch.uint8 and got.shape == (3, 30, 40), name
        want = torch.from_numpy(np.array(open_image(tmp_path / name))).permute(2, 0, 1)
        assert torch.equal(got, want), name   # the same libjpeg-turbo decoding, bit for bit
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "photo.jpg").read_bytes()[:300])
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("truncated.jpg", "text.jpg"):
        with pytest.raises(CorruptImageError, match=name):
            decode_image_tensor(tmp_path / name)
    with pytest.raises(DatasetError, match="missing.jpg"):
        decode_image_tensor(tmp_path / "missing.jpg")


def test_open_image_names_corrupt_files(tmp_path):
    good = _png(tmp_path / "good.png", 7, size=32)
    assert open_image(good).getpixel((0, 0)) == (7, 7, 7)
    truncated = tmp_path / "cls" / "truncated.png"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(CorruptImageError, match="truncated.png"):
        open_image(truncated)
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(CorruptImageError, match="text.jpg"):
        open_image(tmp_path / "text.jpg")
    with pytest.raises(DatasetError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    # Through a dataset the error still names the file, at the sample that is broken.
    ds = build_classification_dataset("imagefolder", tmp_path, "")
    with pytest.raises(CorruptImageError, match="truncated.png"):
        ds[0]


# ---------------------------------------------------------------- detection / segmentation roots
def test_voc_coco_seg_checks_accept_synthshapes(synth):
    assert check_voc_root(synth) == {"VOC2007": {"trainval": TINY["det_train"], "test": TINY["det_test"]},
                                     "VOC2012": {"trainval": TINY["det_train12"]}}
    assert check_voc_root(synth / "VOCdevkit")["VOC2012"]["trainval"] == TINY["det_train12"]
    assert check_coco_root(synth) == {"train2017": TINY["det_train"] + TINY["det_train12"],
                                      "val2017": TINY["det_test"]}
    found = check_seg_root("voc_aug", synth)
    assert found["val"] == TINY["det_train12"] // 2 and found["aug"] == found["train"]


def test_voc_check_lists_every_missing_path(synth, tmp_path):
    root = tmp_path / "VOCdevkit"
    shutil.copytree(synth / "VOCdevkit", root)
    (root / "VOC2007/ImageSets/Main/test.txt").unlink()
    first = (root / "VOC2012/ImageSets/Main/trainval.txt").read_text().split()[0]
    (root / "VOC2012/Annotations" / f"{first}.xml").unlink()
    with pytest.raises(DatasetError) as e:
        check_voc_root(root)
    assert str(root / "VOC2007/ImageSets/Main/test.txt") in str(e.value)
    assert str(root / "VOC2012/Annotations" / f"{first}.xml") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "empty" / "VOC2007"))):
        check_voc_root(tmp_path / "empty", years=("2007",))


def test_coco_and_seg_checks_name_missing_paths(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "annotations" / "instances_val2017.json"))):
        check_coco_root(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "ImageSets" / "Segmentation" / "aug.txt"))):
        check_seg_root("voc_aug", tmp_path)
    with pytest.raises(DatasetError, match="unknown segmentation"):
        check_seg_root("ade20k", tmp_path)


def test_cityscapes_layout(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png")
        _png(tmp_path / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png")
    with pytest.raises(DatasetError, match="labelTrainIds") as e:
        check_seg_root("cityscapes", tmp_path)
    assert "createTrainIdLabelImgs" in str(e.value)
    for split in ("train", "val"):
        _png(tmp_path / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png")
    assert check_seg_root("cityscapes", tmp_path) == {"train": 1, "val": 1}


# ---------------------------------------------------------------- subset lists
def test_packaged_imagenet_subsets_are_verified(tmp_path, monkeypatch):
    one = subsets.load_subset("1percent")
    assert len(one) == 12811 and one[0].endswith(".JPEG") and "/" not in one[0]
    assert len(subsets.load_subset("10percent")) == 128116
    # A modified packaged list is refused: its sha256 no longer matches.
    tampered = tmp_path / "packaged"
    tampered.mkdir()
    (tampered / "1percent.txt").write_text("\n".join(one[:-1]) + "\n")
    monkeypatch.setattr(subsets, "PACKAGED_DIR", tampered)
    with pytest.raises(DatasetError, match="sha256"):
        subsets.load_subset("1percent")


def test_custom_subset_files(tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("a_1.JPEG\n\nb_2.JPEG\n")
    assert subsets.load_subset(custom) == ["a_1.JPEG", "b_2.JPEG"]
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "absent.txt"))):
        subsets.load_subset(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        subsets.load_subset(tmp_path / "empty.txt")
    (tmp_path / "paths.txt").write_text("train/a/a_1.JPEG\n")
    with pytest.raises(DatasetError, match="bare file name"):
        subsets.load_subset(tmp_path / "paths.txt")
    (tmp_path / "dup.txt").write_text("a.png\na.png\n")
    with pytest.raises(DatasetError, match="more than once"):
        subsets.load_subset(tmp_path / "dup.txt")


def test_synthshapes_subsets_select_listed_images(synth):
    ds = build_classification_dataset("synthshapes", synth, "train")
    names = subsets.load_subset("10percent", dataset="synthshapes", root=synth)
    idx = subsets.subset_indices(ds.samples, names)
    assert sorted(Path(ds.samples[i][0]).name for i in idx) == sorted(names)
    assert {ds.targets[i] for i in idx} == set(range(len(ds.classes)))
    with pytest.raises(DatasetError, match="1 of 2 subset images"):
        subsets.subset_indices(ds.samples, [names[0], "not_there.png"])


# ---------------------------------------------------------------- command line
def test_cli_synth_and_check(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cgh_main(["data", "synth", str(out), "--num-classes", "10", "--train-per-class", "2",
                     "--val-per-class", "1", "--image-size", "32", "--det-train", "2", "--det-test", "2",
                     "--det-image-size", "64"]) == 0
    assert "classification: 10 classes, train 20, val 10" in capsys.readouterr().out
    assert cgh_main(["data", "check", "voc", str(out)]) == 0
    assert "VOC2007" in capsys.readouterr().out
    assert cgh_main(["data", "check", "synthshapes", str(out)]) == 0
    assert "train: 20 images, 10 classes" in capsys.readouterr().out
    assert cgh_main(["data", "check", "coco", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere" / "annotations" / "instances_train2017.json") in capsys.readouterr().err
