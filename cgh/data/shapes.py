"""The shape vocabulary of synthshapes and the one rasteriser every mask goes through.

A shape is a list of polygons in unit coordinates (centred on 0, radius about 1), each tagged +1
(filled) or -1 (cut out, for the ring and the crescent). Masks are rasterised with pycocotools'
polygon rasteriser, the very code that turns COCO ``segmentation`` polygons back into masks, so a
polygon written to the COCO JSON decodes to exactly the pixels that were painted and labelled.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular(points, 1.0, -np.pi / 2)
    inner_pts = _regular(points, inner, -np.pi / 2 + np.pi / points)
    return np.stack([outer, inner_pts], 1).reshape(-1, 2)


def _cross(arm: float = 0.34) -> np.ndarray:
    a, b = arm, 0.95
    return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                     [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])


def _arrow() -> np.ndarray:
    return np.array([[-1.0, -0.22], [0.15, -0.22], [0.15, -0.6], [1.0, 0.0],
                     [0.15, 0.6], [0.15, 0.22], [-1.0, 0.22]])


def _heart(n: int = 48) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


# name -> [(polygon in unit coordinates, +1 fill / -1 cut)]. Shapes are chosen to stay distinct under
# rotation and mild aspect jitter (no square/diamond or circle/octagon pairs). Order matters: the
# first ``num_classes`` are used for classification, the hole-free ones for detection.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_regular(48), 1)],
    "square": [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), 1)],
    "triangle": [(_regular(3, 1.0, -np.pi / 2), 1)],
    "star": [(_star(), 1)],
    "cross": [(_cross(), 1)],
    "hexagon": [(_regular(6), 1)],
    "ellipse": [(_regular(48) * np.array([1.0, 0.5]), 1)],
    "arrow": [(_arrow(), 1)],
    "heart": [(_heart(), 1)],
    "ring": [(_regular(48), 1), (_regular(48, 0.55), -1)],
    "crescent": [(_regular(48), 1), (_regular(48, 0.85) + np.array([0.45, 0.0]), -1)],
    "sparkle": [(_star(4, 0.3), 1)],
}
CLASSIFICATION_SHAPES = list(SHAPES)
DETECTION_SHAPES = [n for n, parts in SHAPES.items() if len(parts) == 1]


def place(name: str, center: tuple[float, float], radius: float, angle: float,
          aspect: float = 1.0) -> list[tuple[np.ndarray, int]]:
    """The shape's polygons in pixel coordinates: scaled, stretched along x, rotated, moved."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    out = []
    for poly, sign in SHAPES[name]:
        p = poly * np.array([aspect, 1.0 / aspect]) * radius
        out.append((p @ rot.T + np.asarray(center, dtype=np.float64), sign))
    return out


def rasterize(polygons: list[tuple[np.ndarray, int]], height: int, width: int) -> np.ndarray:
    """Binary (H, W) uint8 mask: union of the filled polygons minus the cut-out ones."""
    mask = np.zeros((height, width), dtype=bool)
    for sign in (1, -1):
        polys = [p.reshape(-1).tolist() for p, sg in polygons if sg == sign]
        if not polys:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        part = mask_utils.decode(rle).astype(bool)
        mask = mask | part if sign == 1 else mask & ~part
    return mask.astype(np.uint8)
