"""Real datasets from local paths, and the path checks every protocol runs before it starts.

Nothing is ever downloaded. Each dataset kind has one check that lists every expected path that is
missing and raises a single ``DatasetError`` naming them, so a wrong ``--root`` fails in a second
with the path to fix, not an hour into a run. Classification datasets come back as torchvision
datasets with ``.classes`` and ``.targets``, read through ``open_image``, which names a corrupt file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from cgh.errors import DatasetError

CLASSIFICATION_KINDS = ("imagefolder", "imagenet", "tiny-imagenet", "stl10", "cifar10", "cifar100", "synthshapes")
STL10_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
# torchvision's on-disk names: folder, and the files each split reads.
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta"),
}
_STL10_FILES = {"train": ["train_X.bin", "train_y.bin"], "test": ["test_X.bin", "test_y.bin"],
                "unlabeled": ["unlabeled_X.bin"]}


class CorruptImageError(DatasetError):
    """An image file exists but cannot be decoded (truncated, not an image)."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully as RGB; a broken file raises ``CorruptImageError`` naming it."""
    try:
        with Image.open(path) as img:
            img.load()      # decode now: PIL is lazy and would fail later, far from the file name
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"corrupt or truncated image {path}: {e}") from e


def decode_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """Decode ``path`` as a uint8 RGB tensor ``[3, H, W]`` (channels-last in memory) with
    ``torchvision.io``, which decodes JPEG/PNG/WebP straight into the tensor: with the crop and
    resize on that tensor (``cgh.transforms.CropFlip``), a GPU-path worker delivers 1.6x the
    images per second it did with PIL (500x375 JPEGs). What it cannot read (other formats,
    16-bit or animated images, broken files) goes through ``open_image``, so PIL decides what is
    corrupt, as on the PIL path."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if image.dtype == torch.uint8 and image.dim() == 3:
            return image
    except RuntimeError:
        pass
    return torch.from_numpy(np.array(open_image(path))).permute(2, 0, 1)


def _raise_missing(what: str, missing: list[Path | str], hint: str = "") -> None:
    if missing:
        listed = "\n  ".join(str(m) for m in missing[:8])
        more = f"\n  ... and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise DatasetError(f"{what}: expected path(s) not found:\n  {listed}{more}{hint}")


def _check_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what}: expected folder {path} does not exist")
    return path


# ---------------------------------------------------------------- classification
def _image_folder(folder: Path, transform: Callable | None, what: str):
    from torchvision.datasets import ImageFolder
    _check_dir(folder, what)
    try:
        return ImageFolder(str(folder), transform=transform, loader=open_image)
    except FileNotFoundError as e:   # no class folders, or class folders without images
        raise DatasetError(f"{what}: {folder} must hold one sub-folder of images per class ({e})") from None


def _tiny_imagenet_folder(root: Path, split: str) -> Path:
    if split not in ("train", "val"):
        raise DatasetError(f"tiny-imagenet: split must be 'train' or 'val' (test has no labels), got {split!r}")
    folder = _check_dir(root / split, "tiny-imagenet")
    if split == "val" and (folder / "val_annotations.txt").is_file() and (folder / "images").is_dir():
        raise DatasetError(
            f"tiny-imagenet: {folder} still has the original layout (images/ + val_annotations.txt); "
            "it must be reorganised by class as val/<wnid>/<file>.JPEG, e.g.\n"
            f"  cd {folder} && while read f c _; do mkdir -p $c && mv images/$f $c/; done < val_annotations.txt "
            "&& rmdir images")
    return folder


def _torchvision_root(root: Path, base_folder: str) -> Path:
    """torchvision wants the parent of its data folder; accept the data folder itself too."""
    return root.parent if root.name == base_folder else root


def _cifar(name: str, root: Path, split: str, transform: Callable | None):
    from torchvision.datasets import CIFAR10, CIFAR100
    base, files, meta = _CIFAR[name]
    split = "test" if split == "val" else split     # CIFAR's held-out split is called test
    if split not in files:
        raise DatasetError(f"{name}: split must be 'train' or 'test' ('val' = 'test'), got {split!r}")
    root = _torchvision_root(root, base)
    _raise_missing(f"{name} (torchvision's python format, not downloaded)",
                   [root / base / f for f in files[split] + [meta] if not (root / base / f).is_file()])
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        return cls(str(root), train=split == "train", transform=transform, download=False)
    except RuntimeError as e:   # md5 mismatch against torchvision's reference checksums
        raise DatasetError(f"{name}: files under {root / base} failed torchvision's integrity check ({e})") from None


def _stl10(root: Path, split: str, transform: Callable | None):
    from torchvision.datasets import STL10
    split = "test" if split == "val" else split
    if split not in STL10_SPLITS:
        raise DatasetError(f"stl10: split must be one of {STL10_SPLITS} ('val' = 'test'), got {split!r}")
    root = _torchvision_root(root, "stl10_binary")
    needed = [f for part in split.split("+") for f in _STL10_FILES[part]] + ["class_names.txt"]
    _raise_missing("stl10 (torchvision's binary format, not downloaded)",
                   [root / "stl10_binary" / f for f in needed if not (root / "stl10_binary" / f).is_file()])
    try:
        ds = STL10(str(root), split=split, transform=transform, download=False)
    except RuntimeError as e:
        raise DatasetError(f"stl10: files under {root / 'stl10_binary'} failed torchvision's "
                           f"integrity check ({e})") from None
    ds.targets = [int(t) for t in ds.labels]   # torchvision calls them labels; -1 = unlabeled
    return ds


def build_classification_dataset(name: str, root: str | os.PathLike, split: str,
                                 transform: Callable | None = None):
    """A labelled image dataset with ``.classes`` and ``.targets`` from a local ``root``.

    ``name``: imagefolder / imagenet (``root/split/<class>/*``), tiny-imagenet (train/ and val/
    reorganised by class), stl10 and cifar10/100 (torchvision's on-disk formats; ``val`` means
    ``test``), synthshapes (``root/classification/split``).
    """
    root = Path(root)
    if name not in CLASSIFICATION_KINDS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(CLASSIFICATION_KINDS)}")
    _check_dir(root, f"{name} root")
    if name in ("imagefolder", "imagenet"):
        return _image_folder(root / split, transform, name)
    if name == "synthshapes":
        return _image_folder(root / "classification" / split, transform, "synthshapes")
    if name == "tiny-imagenet":
        return _image_folder(_tiny_imagenet_folder(root, split), transform, "tiny-imagenet")
    if name == "stl10":
        return _stl10(root, split, transform)
    return _cifar(name, root, split, transform)


# ---------------------------------------------------------------- detection / segmentation roots
def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _check_listed(folder: Path, ids: Iterable[str], suffix: str, missing: list) -> None:
    for image_id in ids:
        f = folder / f"{image_id}{suffix}"
        if not f.is_file():
            missing.append(f)


def _devkit(root: Path) -> Path:
    """Accept the VOCdevkit folder or its parent (a synthshapes root, a datasets/ folder)."""
    return root / "VOCdevkit" if not (root / "VOC2007").is_dir() and (root / "VOCdevkit").is_dir() else root


def check_voc_root(root: str | os.PathLike, years: Iterable[str] = ("2007", "2012"),
                   splits: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Check a VOC devkit for detection (07+12 trainval, 07 test by default); return image counts.

    Every id in a split list must have its JPEG and XML annotation.
    """
    devkit = _devkit(Path(root))
    splits = splits or {"2007": ("trainval", "test"), "2012": ("trainval",)}
    found, missing = {}, []
    for year in years:
        base = devkit / f"VOC{year}"
        if not base.is_dir():
            missing.append(base)
            continue
        found[f"VOC{year}"] = {}
        for split in splits.get(year, ("trainval",)):
            listing = base / "ImageSets" / "Main" / f"{split}.txt"
            if not listing.is_file():
                missing.append(listing)
                continue
            ids = _read_ids(listing)
            _check_listed(base / "JPEGImages", ids, ".jpg", missing)
            _check_listed(base / "Annotations", ids, ".xml", missing)
            found[f"VOC{year}"][split] = len(ids)
    _raise_missing(f"PASCAL VOC devkit {devkit}", missing)
    return found


def _coco(root: Path) -> Path:
    return root / "coco" if not (root / "annotations").is_dir() and (root / "coco").is_dir() else root


def check_coco_root(root: str | os.PathLike, splits: Iterable[str] = ("train2017", "val2017")) -> dict:
    """Check a COCO root (``annotations/instances_<split>.json`` + ``<split>/``); return image file counts."""
    root = _coco(Path(root))
    found, missing = {}, []
    for split in splits:
        ann, images = root / "annotations" / f"instances_{split}.json", root / split
        missing += [p for p in (ann, images) if not p.exists()]
        if images.is_dir():
            found[split] = sum(1 for e in os.scandir(images) if e.name.lower().endswith((".jpg", ".jpeg", ".png")))
    _raise_missing(f"COCO root {root}", missing)
    return found


def check_seg_root(kind: str, root: str | os.PathLike) -> dict:
    """Check a semantic segmentation root in the layout mmsegmentation reads; return counts per split.

    ``voc_aug``: VOC2012 (or a devkit holding it) with SegmentationClass, SegmentationClassAug and
    ImageSets/Segmentation/{train,val,aug}.txt. ``cityscapes``: leftImg8bit/{train,val} and
    gtFine/{train,val} with ``*_gtFine_labelTrainIds.png`` (made by cityscapesscripts).
    """
    root = Path(root)
    missing: list = []
    found = {}
    if kind == "voc_aug":
        if not (root / "JPEGImages").is_dir() and (_devkit(root) / "VOC2012").is_dir():
            root = _devkit(root) / "VOC2012"
        lists = {"train": ("SegmentationClass", "train.txt"), "val": ("SegmentationClass", "val.txt"),
                 "aug": ("SegmentationClassAug", "aug.txt")}
        for split, (label_dir, listing) in lists.items():
            path = root / "ImageSets" / "Segmentation" / listing
            if not path.is_file():
                missing.append(path)
                continue
            ids = _read_ids(path)
            _check_listed(root / "JPEGImages", ids, ".jpg", missing)
            _check_listed(root / label_dir, ids, ".png", missing)
            found[split] = len(ids)
        _raise_missing(f"VOC2012 + SBD aug root {root}", missing)
    elif kind == "cityscapes":
        for split in ("train", "val"):
            images, labels = root / "leftImg8bit" / split, root / "gtFine" / split
            missing += [p for p in (images, labels) if not p.is_dir()]
            if images.is_dir() and labels.is_dir():
                found[split] = sum(1 for _ in images.rglob("*_leftImg8bit.png"))
                if next(labels.rglob("*_gtFine_labelTrainIds.png"), None) is None:
                    missing.append(labels / "<city>" / "*_gtFine_labelTrainIds.png")
        hint = ("\n(labelTrainIds are made by cityscapesscripts' createTrainIdLabelImgs or "
                "mmsegmentation's tools/dataset_converters/cityscapes.py)")
        _raise_missing(f"Cityscapes root {root}", missing,
                       hint if any("labelTrainIds" in str(m) for m in missing) else "")
    else:
        raise DatasetError(f"unknown segmentation dataset {kind!r}; choose voc_aug or cityscapes")
    return found
