"""Shared bits of the pretraining tests: a tiny synthshapes root and a tiny, fast config."""
from __future__ import annotations

from pathlib import Path

from cgh.data.synth import generate


def tiny_synth(root: Path) -> Path:
    """4 classes x 16 train / 4 val images of 32 px (plus the smallest detection part)."""
    generate(root, seed=0, num_classes=4, train_per_class=16, val_per_class=4, image_size=32,
             det_classes=1, det_train=1, det_test=1, det_image_size=64)
    return root


def tiny_overrides(root: Path, out: Path) -> list[str]:
    """ResNet-18 on 16 px views, batch 16, queue 32: an epoch of 4 steps takes about a second."""
    return [f"data.root={root}", f"output_dir={out}", "data.dataset=synthshapes", "data.image_size=16",
            "data.num_workers=0", "model.arch=resnet18", "model.dim=16", "model.hidden_dim=32",
            "model.queue_size=32", "model.bn_splits=2", "optim.batch_size=16", "optim.epochs=2",
            "optim.warmup_epochs=1", "loss.warmup_epochs=1", "optim.base_lr=0.1",
            "optim.teacher_momentum=0.99", "monitor.knn_every=1", "monitor.knn_resize=16",
            "monitor.knn_crop=16", "monitor.knn_k=5", "monitor.log_every=2",
            "monitor.positive_thresholds=[0.05]", "run.device=cpu", "run.checkpoint_every=1",
            "run.progress=false"]
