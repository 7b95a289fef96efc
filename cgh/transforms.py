"""Pretraining views: a weak view for the teacher, strong MoCo-v2 views for the student.

The teacher sees a lightly augmented image so its similarity distribution is a reliable target;
the student sees a heavily corrupted one (ReSSL's weak/contrastive augmentation, used by CGH).
Sizes are arguments so the CPU demo can train on 32-64 px images; the defaults are ImageNet's.
The blur radius follows the view size (``BLUR_SIGMA`` is for a 224 px view, as SimCLR sizes its
kernel at 10% of the image): a radius of 2 px would wipe out a 32 px image, and small-image
codebases (MoCo's CIFAR demo, solo-learn's CIFAR configs) drop the blur for that reason.
Every transform returns ``(student views list, teacher view)``; the default collate turns a batch
of those into ``(list of [B, 3, h, w] tensors, [B, 3, H, W])``, what ``CGHModel`` takes.
With ``gpu_augment=True`` the workers do only the geometry (crop, flip) and draw the photometric
parameters, which ``cgh.gpu_augment`` applies to the batch on the device: each student view is
then a ``(uint8 [3, h, w] image, float32 params)`` pair and the teacher view a uint8 image, so a
batch collates to ``([(uint8 [B, 3, h, w], [B, NUM_PARAMS]), ...], uint8 [B, 3, H, W])``. On that
path image files arrive as uint8 tensors (``cgh.data.datasets.decode_image_tensor``) and are
cropped and resized as tensors (``CropFlip``); in-memory datasets still give PIL images.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from PIL import ImageFilter
from torchvision import transforms as T

from cgh.errors import CghError
from cgh.gpu_augment import pack_params

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Authors' multi-crop (from ReSSL): one 224 px strong view plus four smaller crops whose size and
# scale range shrink together; sizes are given relative to 224 so they follow a smaller ``size``.
MULTI_CROP_SIZES = (192, 160, 128, 96)
MULTI_CROP_MIN_SCALES = (0.172, 0.143, 0.114, 0.086)
MULTI_CROP_MAX_SCALES = (0.86, 0.715, 0.571, 0.429)
BLUR_SIGMA = (0.1, 2.0)     # MoCo v2 / SimCLR blur radius range for a 224 px view
BLUR_REFERENCE_SIZE = 224
COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)   # MoCo v2: brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, BLUR_P = 0.8, 0.2, 0.5


def blur_sigma(size: int) -> tuple[float, float]:
    """The blur radius range for views of ``size`` px (main view size; 224 -> (0.1, 2.0))."""
    scale = size / BLUR_REFERENCE_SIZE
    return BLUR_SIGMA[0] * scale, BLUR_SIGMA[1] * scale


class GaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from ``sigma`` (MoCo v2 / SimCLR)."""

    def __init__(self, sigma=BLUR_SIGMA):
        self.sigma = sigma

    def radius(self) -> float:
        return random.uniform(*self.sigma)

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=self.radius()))


def _geometry(size, scale):
    return [T.RandomResizedCrop(size, scale=tuple(scale)), T.RandomHorizontalFlip()]


def _finish(mean, std):
    return [T.ToTensor(), T.Normalize(mean, std)]


class PhotometricParams:
    """Draws a strong view's photometric parameters in the worker, with the distributions of the
    CPU pipeline (torchvision's ``ColorJitter.get_params``, the same probabilities, the blur radius
    from python ``random``), packed for ``cgh.gpu_augment``. Every draw is made whether or not its
    op is applied, so each view consumes the same amount of randomness."""

    def __init__(self, sigma=BLUR_SIGMA):
        self.jitter = T.ColorJitter(*COLOR_JITTER)
        self.blur = GaussianBlur(sigma)

    def __call__(self) -> torch.Tensor:
        j = self.jitter
        apply_jitter = torch.rand(()) < JITTER_P
        order, *factors = j.get_params(j.brightness, j.contrast, j.saturation, j.hue)
        apply_grayscale = torch.rand(()) < GRAYSCALE_P
        apply_blur = torch.rand(()) < BLUR_P
        return pack_params(apply_jitter, order.tolist(), factors, apply_grayscale, apply_blur, self.blur.radius())


class CropFlip:
    """The GPU path's geometry in the worker: random resized crop + horizontal flip -> uint8
    ``[3, size, size]``. A PIL image goes through torchvision's PIL ops; a uint8 tensor (files
    decoded by ``decode_image_tensor``) is cropped as a view and resized by torch's antialiased
    bilinear uint8 kernel, ~2.5x faster than PIL's resize and within one grey level of it. Both
    draw the crop and the flip from the same random numbers as ``RandomResizedCrop`` and
    ``RandomHorizontalFlip``."""

    def __init__(self, size: int, scale):
        self.crop, self.flip = _geometry(size, scale)
        self.to_tensor = T.PILToTensor()

    def __call__(self, img):
        if not isinstance(img, torch.Tensor):
            return self.to_tensor(self.flip(self.crop(img)))
        top, left, height, width = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        view = img[None, :, top:top + height, left:left + width]
        return self.flip(F.interpolate(view, size=self.crop.size, mode="bilinear", antialias=True,
                                       align_corners=False)[0])


class GpuStudentView:
    """The worker's half of a strong view on the GPU path: ``img -> (uint8 crop, params)``."""

    def __init__(self, size: int, scale, sigma):
        self.geometry = CropFlip(size, scale)
        self.params = PhotometricParams(sigma)

    def __call__(self, img):
        return self.geometry(img), self.params()


def teacher_transform(size: int = 224, scale=(0.2, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      gpu_augment: bool = False):
    """Weak view: random resized crop + horizontal flip (``gpu_augment``: as uint8, normalised on the
    device)."""
    return CropFlip(size, scale) if gpu_augment else T.Compose([*_geometry(size, scale), *_finish(mean, std)])


def student_transform(size: int = 224, scale=(0.2, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      sigma=None, gpu_augment: bool = False):
    """Strong MoCo-v2 view: crop, colour jitter (p 0.8), grayscale (p 0.2), blur (p 0.5), flip.
    ``sigma``: blur radius range; default ``blur_sigma(size)`` ((0.1, 2.0) at 224 px).
    ``gpu_augment``: crop + flip only, with the photometric parameters (``GpuStudentView``); the
    flip moves before the photometric ops, which commute with it (colour ops; a symmetric
    blur with reflect padding)."""
    sigma = blur_sigma(size) if sigma is None else sigma
    if gpu_augment:
        return GpuStudentView(size, scale, sigma)
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(scale)),
        T.RandomApply([T.ColorJitter(*COLOR_JITTER)], p=JITTER_P),
        T.RandomGrayscale(p=GRAYSCALE_P),
        T.RandomApply([GaussianBlur(sigma)], p=BLUR_P),
        T.RandomHorizontalFlip(),
        *_finish(mean, std),
    ])


class TwoViewTransform:
    """``img -> ([strong view], weak view)``: one student view and the teacher's view."""

    def __init__(self, size: int = 224, scale=(0.2, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 gpu_augment: bool = False):
        self.student = student_transform(size, scale, mean, std, gpu_augment=gpu_augment)
        self.teacher = teacher_transform(size, scale, mean, std, gpu_augment=gpu_augment)

    def __call__(self, img):
        return [self.student(img)], self.teacher(img)


class MultiCropTransform:
    """``img -> ([strong view, small crop 1, ...], weak view)`` as in the authors' multi-crop.

    ``crop_sizes`` default to the authors' 192/160/128/96 scaled by ``size / 224`` (so a 64 px demo
    gets 55/46/37/27 px crops); each small crop uses the strong augmentation with its own crop
    scale range and the main view's blur radius (the authors use one blur setting for all crops).
    """

    def __init__(self, size: int = 224, scale=(0.2, 1.0), crop_sizes=None,
                 min_scales=MULTI_CROP_MIN_SCALES, max_scales=MULTI_CROP_MAX_SCALES,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, gpu_augment: bool = False):
        if crop_sizes is None:
            crop_sizes = [max(8, round(s * size / 224)) for s in MULTI_CROP_SIZES]
        if not len(crop_sizes) == len(min_scales) == len(max_scales):
            raise CghError(f"multi-crop needs one min and max scale per crop size (got "
                           f"{len(crop_sizes)} sizes, {len(min_scales)} min, {len(max_scales)} max)")
        self.main = TwoViewTransform(size, scale, mean, std, gpu_augment)
        self.small = [student_transform(s, (lo, hi), mean, std, sigma=blur_sigma(size), gpu_augment=gpu_augment)
                      for s, lo, hi in zip(crop_sizes, min_scales, max_scales)]

    def __call__(self, img):
        views, weak = self.main(img)
        return views + [t(img) for t in self.small], weak
