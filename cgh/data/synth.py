"""synthshapes: a deterministic synthetic benchmark written in the real datasets' on-disk formats.

Why: every protocol (kNN, linear, semi-supervised, VOC detection, COCO instance segmentation, VOC
semantic segmentation) must run end to end on a CPU without downloads, through the same loaders as
the real data. So the generator writes an ImageFolder tree, a VOC devkit (2007 + 2012, with
SegmentationClass and SegmentationClassAug) and COCO 2017 JSON, not a private format.

The classification label is the shape only. Classification images are grey (a dark shape on a light
field; see ``_grey_background`` for why); grey levels, size, position, rotation, aspect, shading and
clutter are random per image, so raw pixels classify poorly while features invariant to those
nuisances classify well (``benchmarks/raw_pixel_baseline.py`` measures the gap). Detection and
segmentation scenes stay in colour.

Determinism: each image draws from its own ``numpy`` Generator seeded by (seed, set, class, index),
so a file's bytes depend only on the seed and its own position, never on generation order.
"""
from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from cgh.data.shapes import CLASSIFICATION_SHAPES, DETECTION_SHAPES, place, rasterize
from cgh.errors import DatasetError
from cgh.io import atomic_write_json, sha256_file

MANIFEST = "synthshapes.json"
FORMAT_VERSION = 2            # 2: grey classification images, 100 val per class by default
IGNORE_INDEX = 255            # VOC's "void" label on object boundaries
SUBSET_FRACTIONS = {"1percent": 0.01, "10percent": 0.10}
# Stream ids keep the per-image generators of different sets apart.
_CLS, _SUBSET, _VOC07, _VOC12 = 1, 2, 7, 12
_SUPERSAMPLE = 4              # classification shapes are anti-aliased by 4x4 supersampling


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved class index), flat RGB list for 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


# ---------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field, optional stripe/checker texture, pixel noise. (H, W, 3) float."""
    g = int(rng.integers(2, 7))
    low = Image.fromarray(rng.integers(0, 256, (g, g, 3), dtype=np.uint8))
    bg = np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.float32).copy()
    pattern = rng.random()
    if pattern < 0.6:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.04, 0.3), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        if pattern < 0.2:  # checker: product of two orthogonal waves
            wave = np.sign(wave * np.sin(2 * np.pi * freq * (-xx * np.sin(theta) + yy * np.cos(theta))))
        bg += rng.uniform(10, 40) * wave[..., None]
    bg += rng.normal(0, rng.uniform(3, 15), bg.shape)
    return bg


def _grey_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Classification background: one light grey level with mild pixel noise. (H, W, 3) float.

    Why grey: a colour drawn per image survives MoCo v2's colour jitter (hue +-0.1) in both views,
    so instance discrimination learns colour first and its features collapse onto the few colour
    directions (measured: rank ~4 queues, kNN below random init). Grey images leave the shape,
    with its size, position and rotation, as what tells one image from another.
    """
    return np.full((size, size, 3), rng.uniform(170, 240), np.float32) + rng.normal(0, 4, (size, size, 3))


def _random_colour(rng: np.random.Generator, grey: bool = False) -> tuple[int, int, int]:
    return (int(rng.integers(0, 256)),) * 3 if grey else tuple(int(v) for v in rng.integers(0, 256, 3))


def _clutter(rng: np.random.Generator, img: Image.Image, count: int, max_len: float, max_width: int = 2,
             grey: bool = False) -> None:
    """Distractors drawn in place: short lines, dots and arcs in random colours (or grey levels)."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(count):
        kind = rng.integers(3)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        colour = _random_colour(rng, grey)
        if kind == 0:
            a, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 1.0) * max_len
            draw.line([x, y, x + length * np.cos(a), y + length * np.sin(a)], fill=colour,
                      width=int(rng.integers(1, max_width + 1)))
        elif kind == 1:
            r = rng.uniform(0.8, 2.5) * max_width / 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            r = rng.uniform(0.2, 0.6) * max_len
            start = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(40, 160), fill=colour)


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random colour far enough (RGB distance) from ``against`` that the shape stays visible."""
    for _ in range(20):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if np.linalg.norm(colour - against) > 110:
            break
    return colour


def _fill(rng: np.random.Generator, colour: np.ndarray, size: int) -> np.ndarray:
    """The shape's paint: its colour with a linear shading gradient and mild noise. (H, W, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    a = rng.uniform(0, 2 * np.pi)
    shade = 1 + rng.uniform(0, 0.35) * (xx * np.cos(a) + yy * np.sin(a))
    return colour * shade[..., None] + rng.normal(0, 4, (size, size, 3))


def _to_uint8(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def classification_image(seed: int, class_index: int, index: int, shape: str, size: int) -> Image.Image:
    """One grey image whose only label-bearing content is ``shape`` (a dark shape on a light field)."""
    rng = np.random.default_rng([seed, _CLS, class_index, index])
    bg_img = _to_uint8(_grey_background(rng, size))
    _clutter(rng, bg_img, int(rng.integers(1, 5)), max_len=size * 0.4, max_width=1, grey=True)
    bg = np.asarray(bg_img, dtype=np.float32)

    radius = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(0.8 * radius, size - 0.8 * radius, 2)   # may touch the border a little
    angle, aspect = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15)
    ss = _SUPERSAMPLE
    polys = place(shape, (cx * ss, cy * ss), radius * ss, angle, aspect)
    alpha = rasterize(polys, size * ss, size * ss).reshape(size, ss, size, ss).mean((1, 3))
    alpha = alpha[..., None].astype(np.float32)
    grey = np.full(3, rng.uniform(10, 80), np.float32)
    img = _to_uint8(bg * (1 - alpha) + _fill(rng, grey, size) * alpha)
    _clutter(rng, img, int(rng.integers(0, 2)), max_len=size * 0.25, max_width=1, grey=True)   # a little occlusion
    return img


def _dilate(m: np.ndarray) -> np.ndarray:
    p, out = np.pad(m, 1), np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return out


def _erode(m: np.ndarray) -> np.ndarray:
    p, out = np.pad(m, 1), np.ones_like(m)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return out


def _layout(rng: np.random.Generator, classes: list[str], size: int, count: int) -> list[dict]:
    """Up to ``count`` shapes placed at random with their boxes at least 4 px apart (geometry only)."""
    boxes, objects = [], []
    for _ in range(count):
        category = int(rng.integers(len(classes)))
        for attempt in range(60):
            # Crowded scenes: shrink the candidate size over the attempts so more shapes fit.
            radius = rng.uniform(0.12, 0.24) * size * (1 - attempt / 80)
            angle, aspect = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15)
            (poly, _), = place(classes[category], (0.0, 0.0), radius, angle, aspect)
            lo, hi = poly.min(0), poly.max(0)
            cx = rng.uniform(3 - lo[0], size - 3 - hi[0])
            cy = rng.uniform(3 - lo[1], size - 3 - hi[1])
            box = (lo[0] + cx, lo[1] + cy, hi[0] + cx, hi[1] + cy)
            if not all(box[0] > b[2] + 4 or box[2] < b[0] - 4 or box[1] > b[3] + 4 or box[3] < b[1] - 4
                       for b in boxes):
                continue
            # Rounded before rasterising: the JSON holds exactly the polygon the mask came from.
            poly = np.round(poly + np.array([cx, cy]), 2)
            mask = rasterize([(poly, 1)], size, size).astype(bool)
            if mask.sum() >= 16:
                boxes.append(box)
                objects.append({"category": category, "polygon": poly.reshape(-1).tolist(), "mask": mask})
                break
    return objects


def scene(seed: int, stream: int, index: int, classes: list[str], size: int):
    """A detection/segmentation scene: 2-4 shapes whose boxes are at least 4 px apart.

    Objects are painted without anti-aliasing through their rasterised mask, so image, mask, box,
    polygon and semantic label agree pixel for pixel. Returns (RGB image, objects) where each
    object is {"category": index into classes, "polygon": flat [x0, y0, ...], "mask": (H, W) bool}.
    """
    rng = np.random.default_rng([seed, stream, index])
    img = _to_uint8(_background(rng, size))
    _clutter(rng, img, int(rng.integers(2, 7)), max_len=size * 0.2)
    pixels = np.asarray(img, dtype=np.float32).copy()
    count = int(rng.integers(2, 5))
    for _ in range(50):   # a big first shape can leave no room for a second one: lay out again
        objects = _layout(rng, classes, size, count)
        if len(objects) >= 2:
            break
    for obj in objects:
        colour = _contrasting_colour(rng, pixels[obj["mask"]].mean(0))
        pixels[obj["mask"]] = _fill(rng, colour, size)[obj["mask"]]
    return _to_uint8(pixels), objects


def semantic_labels(objects: list[dict], size: int) -> np.ndarray:
    """VOC-style label map: 0 background, category+1 inside, 255 on a 2-px band over each outline."""
    labels = np.zeros((size, size), dtype=np.uint8)
    for obj in objects:
        labels[_erode(obj["mask"])] = obj["category"] + 1
    for obj in objects:
        labels[_dilate(obj["mask"]) & ~_erode(obj["mask"])] = IGNORE_INDEX
    return labels


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight inclusive pixel box (x0, y0, x1, y1), 0-based."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ---------------------------------------------------------------- writers
def _voc_xml(year: str, image_id: str, size: int, objects: list[dict], classes: list[str]) -> bytes:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = f"VOC{year}"
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(ann, "source"), "database").text = "synthshapes"
    sz = ET.SubElement(ann, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, key).text = str(value)
    ET.SubElement(ann, "segmented").text = "1"
    for obj in objects:
        node = ET.SubElement(ann, "object")
        ET.SubElement(node, "name").text = classes[obj["category"]]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = "0"
        bb = ET.SubElement(node, "bndbox")
        x0, y0, x1, y1 = mask_box(obj["mask"])
        # VOC boxes are 1-based inclusive pixel indices.
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ET.SubElement(bb, key).text = str(value)
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _write_voc_year(devkit: Path, year: str, scenes: dict[str, list], split_of: dict[str, str],
                    classes: list[str], size: int, palette: list[int]) -> dict[str, int]:
    """Write one VOC<year> folder; ``split_of`` maps image id -> "train"/"val"/"test"."""
    root = devkit / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    aug = root / "SegmentationClassAug" if year == "2012" else None
    if aug:
        aug.mkdir(exist_ok=True)
    for image_id, (img, objects) in scenes.items():
        img.save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
        (root / "Annotations" / f"{image_id}.xml").write_bytes(_voc_xml(year, image_id, size, objects, classes))
        labels = semantic_labels(objects, size)
        png = Image.fromarray(labels)
        png.putpalette(palette)   # turns the "L" image into a palette ("P") image, as VOC ships
        png.save(root / "SegmentationClass" / f"{image_id}.png")
        if aug:  # the DeepLab/mmseg "aug" set stores plain single-channel label PNGs
            Image.fromarray(labels).save(aug / f"{image_id}.png")

    ids = {s: [i for i, sp in split_of.items() if sp == s] for s in ("train", "val", "test")}
    ids["trainval"] = ids["train"] + ids["val"]
    main_splits = ["train", "val", "trainval"] + (["test"] if ids["test"] else [])
    for split in main_splits:
        _write_lines(root / "ImageSets/Main" / f"{split}.txt", ids[split])
        for ci, name in enumerate(classes):   # per-class lists as in the real devkit
            present = {i: any(o["category"] == ci for o in scenes[i][1]) for i in ids[split]}
            _write_lines(root / "ImageSets/Main" / f"{name}_{split}.txt",
                         [f"{i} {1 if p else -1:>2}" for i, p in present.items()])
    for split in ("train", "val", "trainval"):
        _write_lines(root / "ImageSets/Segmentation" / f"{split}.txt", ids[split])
    if aug:  # mmseg's voc_aug: train on aug.txt, i.e. every labelled image outside the val split
        _write_lines(root / "ImageSets/Segmentation" / "aug.txt", ids["train"])
    return {split: len(ids[split]) for split in main_splits}


def _coco_json(entries: list[tuple[str, Path, list[dict]]], classes: list[str], size: int) -> dict:
    images, annotations = [], []
    for image_id, (file_name, _, objects) in enumerate(entries, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            rle = mask_utils.merge(mask_utils.frPyObjects([obj["polygon"]], size, size))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["category"] + 1,
                "segmentation": [obj["polygon"]], "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    return {"info": {"description": "synthshapes (synthetic, generated by cgh data synth)", "version": "1"},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(classes)]}


def _prepare_out_dir(out: Path) -> None:
    """Regenerate in place only over a previous synthshapes root; never clobber anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise DatasetError(f"output folder {out} is not empty and holds no {MANIFEST}; "
                               "choose an empty or new folder")
        (out / MANIFEST).unlink()
        for sub in ("classification", "VOCdevkit", "coco"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def generate(out_dir: str | os.PathLike, seed: int = 0, num_classes: int = 10, train_per_class: int = 60,
             val_per_class: int = 100, image_size: int = 64, det_classes: int = 5, det_train: int = 40,
             det_train12: int | None = None, det_test: int = 20, det_image_size: int = 128) -> dict:
    """Write the whole synthshapes benchmark under ``out_dir`` and return its manifest.

    Sizes: ``num_classes`` shapes x ``train_per_class``/``val_per_class`` classification images of
    ``image_size`` px; ``det_train`` VOC2007 trainval, ``det_test`` VOC2007 test and ``det_train12``
    (default = det_train) VOC2012 trainval scenes of ``det_image_size`` px with ``det_classes``
    shape categories. COCO train2017 = VOC07 + VOC12 trainval scenes, val2017 = VOC07 test.
    The manifest (``synthshapes.json``) is written last, so its presence means the root is complete.
    """
    if not 2 <= num_classes <= len(CLASSIFICATION_SHAPES):
        raise DatasetError(f"num_classes must be in 2..{len(CLASSIFICATION_SHAPES)}, got {num_classes}")
    if not 1 <= det_classes <= len(DETECTION_SHAPES):
        raise DatasetError(f"det_classes must be in 1..{len(DETECTION_SHAPES)}, got {det_classes}")
    if min(train_per_class, val_per_class, image_size, det_train, det_test, det_image_size) < 1:
        raise DatasetError("every synthshapes size must be >= 1")
    if image_size < 16 or det_image_size < 48:
        raise DatasetError("image_size must be >= 16 and det_image_size >= 48 pixels")
    det_train12 = det_train if det_train12 is None else det_train12
    out = Path(out_dir)
    _prepare_out_dir(out)
    sizes = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                 image_size=image_size, det_classes=det_classes, det_train=det_train,
                 det_train12=det_train12, det_test=det_test, det_image_size=det_image_size)

    # Classification: ImageFolder; class folders sorted like ImageFolder sorts them.
    shapes = sorted(CLASSIFICATION_SHAPES[:num_classes])
    cls_root = out / "classification"
    train_names: dict[str, list[str]] = {}
    for ci, shape in enumerate(shapes):
        for split, start, count in (("train", 0, train_per_class), ("val", train_per_class, val_per_class)):
            folder = cls_root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for idx in range(start, start + count):
                name = f"{shape}_{idx:05d}.png"   # basenames unique across splits (subset lists)
                classification_image(seed, ci, idx, shape, image_size).save(folder / name)
                if split == "train":
                    train_names.setdefault(shape, []).append(name)
    subsets = {}
    for subset, frac in SUBSET_FRACTIONS.items():
        # SimCLR format: one basename per line; at least one image per class so every class is seen.
        lines = []
        for ci, shape in enumerate(shapes):
            k = max(1, round(frac * train_per_class))
            rng = np.random.default_rng([seed, _SUBSET, ci, int(frac * 1000)])
            lines += [train_names[shape][i] for i in sorted(rng.choice(train_per_class, k, replace=False))]
        path = cls_root / "subsets" / f"{subset}.txt"
        _write_lines(path, lines)
        subsets[subset] = {"file": str(path.relative_to(out)), "count": len(lines), "sha256": sha256_file(path)}

    # Detection / segmentation scenes, shared by the VOC devkit and COCO.
    det_names = DETECTION_SHAPES[:det_classes]
    s = det_image_size
    voc07 = {f"{i + 1:06d}": scene(seed, _VOC07, i, det_names, s) for i in range(det_train + det_test)}
    voc12 = {f"2012_{i + 1:06d}": scene(seed, _VOC12, i, det_names, s) for i in range(det_train12)}
    split07 = {iid: ("test" if n >= det_train else ("train" if n % 2 == 0 else "val"))
               for n, iid in enumerate(voc07)}
    split12 = {iid: ("train" if n % 2 == 0 else "val") for n, iid in enumerate(voc12)}
    devkit = out / "VOCdevkit"
    palette = voc_palette()
    voc_counts = {"VOC2007": _write_voc_year(devkit, "2007", voc07, split07, det_names, s, palette),
                  "VOC2012": _write_voc_year(devkit, "2012", voc12, split12, det_names, s, palette)}

    coco_root = out / "coco"
    (coco_root / "annotations").mkdir(parents=True, exist_ok=True)
    coco_sets = {
        "train2017": [(devkit / "VOC2007", iid) for iid, sp in split07.items() if sp != "test"]
                     + [(devkit / "VOC2012", iid) for iid in voc12],
        "val2017": [(devkit / "VOC2007", iid) for iid, sp in split07.items() if sp == "test"],
    }
    coco_counts = {}
    for split, members in coco_sets.items():
        (coco_root / split).mkdir(exist_ok=True)
        entries, number = [], 0
        for year_dir, iid in members:
            number += 1
            file_name = f"{number:012d}.jpg"
            shutil.copyfile(year_dir / "JPEGImages" / f"{iid}.jpg", coco_root / split / file_name)
            objects = (voc07 if year_dir.name == "VOC2007" else voc12)[iid][1]
            entries.append((file_name, year_dir, objects))
        coco = _coco_json(entries, det_names, s)
        (coco_root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        coco_counts[split] = {"images": len(coco["images"]), "annotations": len(coco["annotations"])}

    manifest = {
        "name": "synthshapes", "format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes,
        "classification": {"root": "classification", "classes": shapes, "image_size": image_size,
                           "splits": {"train": train_per_class * num_classes,
                                      "val": val_per_class * num_classes},
                           "subsets": subsets},
        "detection": {"classes": det_names, "image_size": s, "voc_root": "VOCdevkit", "voc": voc_counts,
                      "coco_root": "coco", "coco": coco_counts},
        "segmentation": {"classes": ["background"] + det_names, "ignore_index": IGNORE_INDEX,
                         "voc_aug_root": "VOCdevkit/VOC2012"},
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a generated root; a clear error when the root is not (completely) generated."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"not a synthshapes root: expected {path} (generate one with `cgh data synth {root}`)")
    return json.loads(path.read_text())
