"""Pretraining views: sizes, structure after collation, and a weak view without colour changes."""
from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import default_collate

from cgh.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform, TwoViewTransform


def test_two_view_and_multi_crop_shapes_after_collation():
    img = Image.new("RGB", (80, 70), (200, 30, 90))
    two = TwoViewTransform(size=32)
    batch = default_collate([two(img) for _ in range(3)])
    students, teacher = batch
    assert [s.shape for s in students] == [(3, 3, 32, 32)] and teacher.shape == (3, 3, 32, 32)

    multi = MultiCropTransform(size=64)  # authors' 192/160/128/96 at 224 px, scaled to 64 px
    students, teacher = default_collate([multi(img) for _ in range(2)])
    assert [s.shape[-1] for s in students] == [64, 55, 46, 37, 27]
    assert teacher.shape == (2, 3, 64, 64)


def test_teacher_view_keeps_colours_student_view_changes_them():
    colour = (200, 30, 90)
    img = Image.new("RGB", (48, 48), colour)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
    two = TwoViewTransform(size=32)
    torch.manual_seed(0)
    changed = 0
    for _ in range(20):
        (strong,), weak = two(img)
        # Weak view = crop + flip only: a uniform image stays exactly its colour.
        torch.testing.assert_close(weak, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5, rtol=0)
        changed += not torch.allclose(strong, weak, atol=1e-3)
    assert changed >= 10  # colour jitter p=0.8 and grayscale p=0.2 alter most strong views
