"""Labelled-subset lists for the semi-supervised protocol, in SimCLR's file format.

The format is one image file basename per line (``n01440764_10026.JPEG``). The two ImageNet lists
used by every paper since SimCLR ship with the package and are verified against their published
sha256 on every load, so a silently edited list cannot change a 1% / 10% result. A synthshapes
root carries its own lists, verified against its manifest; any other file in the same format is
accepted as is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from cgh.errors import DatasetError
from cgh.io import sha256_file

PACKAGED_DIR = Path(__file__).resolve().parent / "subsets"
# Full sha256 of the SimCLR ImageNet split files (12,811 and 128,116 names).
SUBSET_SHA256 = {
    "1percent": "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17",
    "10percent": "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091",
}


def read_subset_file(path: str | os.PathLike, expected_sha256: str | None = None) -> list[str]:
    """Basenames listed in ``path`` (blank lines skipped); checks existence, hash, format, duplicates."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"subset file not found: expected {path}")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise DatasetError(f"subset file {path} has sha256 {actual}, expected {expected_sha256}; "
                               "the list was modified or truncated")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"subset file {path} is empty; expected one image file name per line")
    for lineno, name in enumerate(names, 1):
        if "/" in name or "\\" in name or " " in name:
            raise DatasetError(f"subset file {path}: entry {lineno} {name!r} is not a bare file name "
                               "(SimCLR format: one basename per line, e.g. n01440764_10026.JPEG)")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DatasetError(f"subset file {path} lists {name!r} more than once")
        seen.add(name)
    return names


def load_subset(spec: str | os.PathLike, dataset: str = "imagenet", root: str | os.PathLike | None = None) -> list[str]:
    """Basenames of a labelled subset.

    ``spec`` is "1percent" / "10percent" (the packaged ImageNet lists, or for ``dataset ==
    "synthshapes"`` the lists generated under ``root``) or the path of any file in the same format.
    """
    name = str(spec)
    if name in SUBSET_SHA256:
        if dataset == "synthshapes":
            from cgh.data.synth import read_manifest   # local import: keeps this module light
            if root is None:
                raise DatasetError("a synthshapes subset needs the dataset root")
            info = read_manifest(root)["classification"]["subsets"][name]
            return read_subset_file(Path(root) / info["file"], info["sha256"])
        return read_subset_file(PACKAGED_DIR / f"{name}.txt", SUBSET_SHA256[name])
    return read_subset_file(name)


def subset_indices(samples: Iterable[tuple[str, int]], names: list[str]) -> list[int]:
    """Indices of the ``(path, target)`` samples (an ImageFolder's ``.samples``) whose basename is listed.

    Every listed name must be found: a subset that silently shrinks would change the protocol.
    """
    wanted = set(names)
    indices, found = [], set()
    for i, (path, _) in enumerate(samples):
        base = os.path.basename(path)
        if base in wanted:
            indices.append(i)
            found.add(base)
    missing = [n for n in names if n not in found]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(names)} subset images are not in the dataset "
                           f"(first: {missing[:3]}); is it the right dataset root and split?")
    return indices
