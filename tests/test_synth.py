"""synthshapes parses back with the real parsers, its annotations agree, and it is deterministic."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage
from torchvision.datasets import ImageFolder

from _helpers_data import TINY, tree_digest
from cgh.data.synth import MANIFEST, generate

SQUARE = np.ones((3, 3), dtype=bool)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=0, **TINY)
    return out


@pytest.fixture(scope="module")
def manifest(root) -> dict:
    return json.loads((root / MANIFEST).read_text())


def voc_objects(xml_path: Path, classes: list[str]) -> list[tuple[int, list[float]]]:
    """Read a VOC XML the way detectron2's load_voc_instances does: 1-based -> 0-based x0, y0."""
    tree = ET.parse(xml_path)
    out = []
    for obj in tree.findall("object"):
        bb = obj.find("bndbox")
        box = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        box[0] -= 1.0
        box[1] -= 1.0
        out.append((classes.index(obj.find("name").text), box))
    return out


def test_classification_is_an_imagefolder_with_unique_basenames(root, manifest):
    classes = manifest["classification"]["classes"]
    assert len(classes) >= 10
    for split, per_class in (("train", TINY["train_per_class"]), ("val", TINY["val_per_class"])):
        ds = ImageFolder(str(root / "classification" / split))      # torchvision's own reader
        assert ds.classes == classes
        assert Counter(ds.targets) == {i: per_class for i in range(len(classes))}
        img, target = ds[0]
        assert img.size == (TINY["image_size"],) * 2 and img.mode == "RGB"
    names = [p.name for p in (root / "classification").rglob("*.png")]
    assert len(names) == len(set(names)) == len(classes) * (TINY["train_per_class"] + TINY["val_per_class"])
    # SimCLR-format subsets: basenames of train images, every class represented.
    train = {p.name: p.parent.name for p in (root / "classification" / "train").rglob("*.png")}
    for subset in ("1percent", "10percent"):
        lines = (root / "classification" / "subsets" / f"{subset}.txt").read_text().split()
        assert lines and set(lines) <= set(train)
        assert {train[n] for n in lines} == set(classes)


def test_classification_images_are_grey_and_scenes_in_colour(root):
    """Classification images carry no colour (a per-image colour is what instance discrimination
    learned instead of shape, DEVELOPMENT.md "Learning signal"): their channels differ only by independent
    pixel noise (sigma 4 per channel, so ~5.7 for a difference), never by a cast or a coloured
    stroke. Detection scenes keep their colours."""
    for path in sorted((root / "classification").rglob("*.png")):
        a = np.asarray(Image.open(path), dtype=np.float32)
        for d in (a[..., 0] - a[..., 1], a[..., 1] - a[..., 2]):
            assert abs(d.mean()) < 1.5 and d.std() < 8 and np.abs(d).max() < 40, path
    scenes = [np.asarray(Image.open(p), dtype=np.int16)
              for p in sorted((root / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))]
    assert all(np.abs(a[..., 0] - a[..., 1]).max() > 40 or np.abs(a[..., 1] - a[..., 2]).max() > 40
               for a in scenes)


def test_voc_boxes_match_segmentation_masks(root, manifest):
    """Each XML box (read like detectron2) is the tight box of one object of the right class in the PNG."""
    classes = manifest["detection"]["classes"]
    for year, splits in (("2007", ("trainval", "test")), ("2012", ("trainval",))):
        base = root / "VOCdevkit" / f"VOC{year}"
        for split in splits:
            ids = (base / "ImageSets/Main" / f"{split}.txt").read_text().split()
            assert len(ids) == manifest["detection"]["voc"][f"VOC{year}"][split]
            for image_id in ids:
                objects = voc_objects(base / "Annotations" / f"{image_id}.xml", classes)
                assert 2 <= len(objects) <= 4
                png = Image.open(base / "SegmentationClass" / f"{image_id}.png")
                assert png.mode == "P"
                labels = np.asarray(png)
                assert Image.open(base / "JPEGImages" / f"{image_id}.jpg").size == labels.shape[::-1]
                # Objects (their label plus the 255 band) are separate connected components.
                components, n = ndimage.label(labels != 0, structure=SQUARE)
                assert n == len(objects)
                for comp in range(1, n + 1):
                    region = components == comp
                    inside = np.unique(labels[region & (labels != 255)])
                    ys, xs = np.nonzero(region)
                    # The band reaches 1 px outside the object, so the object's pixels span
                    # [min+1, max-1]; detectron2's box is [x0, y0, x1 + 1, y1 + 1] in pixel edges.
                    box = [xs.min() + 1.0, ys.min() + 1.0, float(xs.max()), float(ys.max())]
                    assert (int(inside.item()) - 1, box) in objects


def test_voc_parses_with_detectron2(root, manifest):
    from transfer.compat.detectron2_compat import Detectron2MissingError, import_detectron2
    try:
        import_detectron2()      # with the project's shims for today's Pillow and numpy
    except Detectron2MissingError as e:
        pytest.skip(str(e))
    from detectron2.data.datasets import pascal_voc
    classes = manifest["detection"]["classes"]
    base = root / "VOCdevkit" / "VOC2007"
    dicts = pascal_voc.load_voc_instances(str(base), "test", classes)
    assert len(dicts) == TINY["det_test"]
    for d in dicts:
        mine = voc_objects(base / "Annotations" / f"{d['image_id']}.xml", classes)
        assert [(a["category_id"], a["bbox"]) for a in d["annotations"]] == mine


def test_coco_polygons_masks_boxes_and_semantic_png_agree(root, manifest):
    """pycocotools' masks rebuild the VOC label PNG exactly (interior + 255 band), boxes enclose them."""
    voc07 = root / "VOCdevkit" / "VOC2007"
    test_ids = (voc07 / "ImageSets/Main/test.txt").read_text().split()
    coco = COCO(str(root / "coco/annotations/instances_val2017.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == manifest["detection"]["classes"]
    assert min(coco.getCatIds()) == 1
    images = sorted(coco.loadImgs(coco.getImgIds()), key=lambda im: im["id"])
    assert len(images) == len(test_ids)
    for image, voc_id in zip(images, test_ids):
        jpg = root / "coco/val2017" / image["file_name"]
        assert jpg.read_bytes() == (voc07 / "JPEGImages" / f"{voc_id}.jpg").read_bytes()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        expected = np.zeros((image["height"], image["width"]), np.uint8)
        band = np.zeros_like(expected, dtype=bool)
        for ann in anns:
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list)
            m = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == m.sum()
            # Independent rasteriser: pixel centres inside the polygon (matplotlib) give the same
            # mask up to pixels on its outline.
            inner = ndimage.binary_erosion(m, SQUARE)
            outline = ndimage.binary_dilation(m, SQUARE) & ~inner
            poly = MplPath(np.asarray(ann["segmentation"][0]).reshape(-1, 2))
            yy, xx = np.mgrid[0:image["height"], 0:image["width"]]
            centres = poly.contains_points(np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)).reshape(m.shape)
            assert not ((centres ^ m) & ~outline).any()
            assert (centres ^ m).sum() < 0.1 * m.sum()
            expected[inner] = ann["category_id"]
            band |= ndimage.binary_dilation(m, SQUARE) & ~inner
        expected[band] = 255
        labels = np.asarray(Image.open(voc07 / "SegmentationClass" / f"{voc_id}.png"))
        np.testing.assert_array_equal(labels, expected)
        # the XML boxes are the same boxes
        xml = voc_objects(voc07 / "Annotations" / f"{voc_id}.xml", manifest["detection"]["classes"])
        assert sorted(xml) == sorted((a["category_id"] - 1, [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                             a["bbox"][1] + a["bbox"][3]]) for a in anns)


def test_every_scene_has_two_to_four_separate_objects():
    from cgh.data.shapes import DETECTION_SHAPES
    from cgh.data.synth import scene
    for index in range(60):
        _, objects = scene(5, 7, index, DETECTION_SHAPES, 48)   # the smallest size allowed
        assert 2 <= len(objects) <= 4
        union = np.sum([ndimage.binary_dilation(o["mask"], SQUARE) for o in objects], axis=0)
        assert union.max() == 1      # even the 1-px outer bands never touch


def test_coco_train_holds_voc07_and_voc12_trainval(root, manifest):
    coco = COCO(str(root / "coco/annotations/instances_train2017.json"))
    assert len(coco.getImgIds()) == TINY["det_train"] + TINY["det_train12"]
    for image in coco.loadImgs(coco.getImgIds()):
        assert (root / "coco/train2017" / image["file_name"]).is_file()


def test_segmentation_aug_and_palette(root):
    voc12 = root / "VOCdevkit" / "VOC2012"
    png = Image.open(next((voc12 / "SegmentationClass").glob("*.png")))
    palette = png.getpalette()
    assert palette[3:6] == [128, 0, 0] and palette[255 * 3:256 * 3] == [224, 224, 192]   # VOC colours
    for image_id in (voc12 / "ImageSets/Segmentation/aug.txt").read_text().split():
        aug = Image.open(voc12 / "SegmentationClassAug" / f"{image_id}.png")
        assert aug.mode == "L"
        palette_png = Image.open(voc12 / "SegmentationClass" / f"{image_id}.png")
        np.testing.assert_array_equal(np.asarray(aug), np.asarray(palette_png))
    val = set((voc12 / "ImageSets/Segmentation/val.txt").read_text().split())
    assert val and not val & set((voc12 / "ImageSets/Segmentation/aug.txt").read_text().split())
    assert not (root / "VOCdevkit/VOC2012/ImageSets/Main/test.txt").exists()


def test_generation_is_deterministic_per_seed_and_per_image(root, tmp_path):
    same = tmp_path / "same"
    generate(same, seed=0, **TINY)
    assert tree_digest(same) == tree_digest(root)

    other = tmp_path / "other"
    generate(other, seed=1, **TINY)
    a, b = tree_digest(root), tree_digest(other)
    images = [k for k in a if k.endswith((".png", ".jpg"))]
    assert sum(a[k] != b.get(k) for k in images) == len(images)

    # Each image depends only on (seed, its own index): a bigger set starts with the same files.
    bigger = tmp_path / "bigger"
    generate(bigger, seed=0, **{**TINY, "train_per_class": TINY["train_per_class"] + 2, "det_test": 6})
    c = tree_digest(bigger)
    for k in images:
        if "/train/" in k or "VOC2012/JPEGImages" in k:
            assert c[k] == a[k], k


def test_raw_pixels_classify_poorly(tmp_path):
    """Grey levels, pose, size and clutter vary, so raw-pixel kNN stays far below 100% (chance 10%)."""
    from sklearn.neighbors import KNeighborsClassifier
    generate(tmp_path, seed=3, **{**TINY, "train_per_class": 20, "val_per_class": 8, "det_train": 2,
                                  "det_train12": 2, "det_test": 2})

    def load(split):
        ds = ImageFolder(str(tmp_path / "classification" / split))
        return np.stack([np.asarray(ds[i][0], np.float32).ravel() for i in range(len(ds))]), np.array(ds.targets)

    (xtr, ytr), (xva, yva) = load("train"), load("val")
    acc = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(xtr, ytr).score(xva, yva)
    assert acc < 0.35, acc


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    from cgh.errors import DatasetError
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        generate(tmp_path, **TINY)
    assert (tmp_path / "notes.txt").read_text() == "mine"
