"""Pretraining views: sizes, structure after collation, and a weak view without colour changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

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


def test_blur_radius_follows_the_view_size():
    """(0.1, 2.0) px at 224 px as MoCo v2 / SimCLR; proportionally smaller for smaller views (a 2 px
    radius would erase a 32 px view), and multi-crop's small crops keep the main view's radius."""
    from cgh.transforms import GaussianBlur, blur_sigma

    def blurs(transform):
        return [t.transforms[0] for t in transform.transforms
                if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], GaussianBlur)]

    assert blur_sigma(224) == (0.1, 2.0)
    assert blur_sigma(32) == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    (two_blur,) = blurs(TwoViewTransform(size=32).student)
    assert two_blur.sigma == blur_sigma(32)
    multi = MultiCropTransform(size=224)
    assert [b.sigma for t in multi.small for b in blurs(t)] == [(0.1, 2.0)] * 4
    # Behaviour, not only the setting: at 32 px a blurred edge stays sharp, at 224 px it does not.
    edge = Image.new("RGB", (32, 32), (0, 0, 0))
    edge.paste((255, 255, 255), (16, 0, 32, 32))
    small = np.asarray(GaussianBlur((blur_sigma(32)[1],) * 2)(edge))[16, 14:18, 0]
    large = np.asarray(GaussianBlur((2.0, 2.0))(edge))[16, 14:18, 0]
    assert small[0] < 5 and small[-1] > 250
    assert large[0] > 20 and large[-1] < 235
