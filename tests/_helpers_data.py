"""Small synthshapes roots for the data tests (the lead's conftest provides the shared default one)."""
from __future__ import annotations

import hashlib
from pathlib import Path

# Enough of everything to exercise every writer, small enough to generate in about a second.
TINY = dict(num_classes=10, train_per_class=4, val_per_class=2, image_size=32,
            det_classes=5, det_train=6, det_train12=4, det_test=4, det_image_size=96)


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
