"""The strong view's photometric augmentation on batched tensors, so it can run on the GPU.

On a fast GPU the PIL pipeline cannot feed the step (H100: 640 img/s from 8 workers against
~1100 img/s consumed). With ``data.gpu_augment`` the workers only decode, crop and flip
(``cgh.transforms``, uint8 out: 4x less to pin and copy) and draw each view's random parameters;
this module applies them to the whole batch on the device: colour jitter (p 0.8, per-sample random
order), grayscale (p 0.2), Gaussian blur (p 0.5), normalisation. The draws stay in the workers,
seeded as before, so the augmentation stream and exact resume are unaffected. Nothing here is
random and nothing waits for the host: per-sample choices are masks and ``torch.where``.

Each op is torchvision's tensor functional (``adjust_*``, ``rgb_to_grayscale``, ``gaussian_blur``)
applied per sample. The CPU pipeline works on PIL images and differs slightly (measured for the
blur only): it rounds to 8 bits after every op, PIL's grayscale weighs red 0.299 (torchvision's
tensor op 0.2989, used here), and PIL's ``GaussianBlur(radius)`` approximates a Gaussian of standard
deviation ``radius`` with three box blurs and repeats the edge pixels at the border, where this is
a sampled Gaussian truncated at 3 sigma of the range's largest sigma, over reflect padding: the
same blur strength, within 2 grey levels away from the border (tests/test_gpu_augment.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# One view's parameters, as the workers ship them: a float32 vector laid out as below (a batch
# of views collates to one [B, NUM_PARAMS] tensor, a single small copy to the device).
JITTER = 0                  # 1 = apply colour jitter
ORDER = slice(1, 5)         # the 4 jitter ops in application order (op ids below; torch.randperm(4))
FACTORS = slice(5, 9)       # brightness, contrast, saturation factors and hue shift, by op id
GRAYSCALE = 9               # 1 = convert to grayscale
BLUR = 10                   # 1 = blur
SIGMA = 11                  # blur standard deviation (px)
NUM_PARAMS = 12
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)   # torchvision ColorJitter's op ids

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)   # torchvision's rgb_to_grayscale on tensors


def pack_params(jitter: bool, order: Sequence[int], factors: Sequence[float], grayscale: bool, blur: bool,
                sigma: float) -> torch.Tensor:
    """One view's parameters as the vector ``PhotometricAugment`` reads (layout above)."""
    return torch.tensor([float(jitter), *map(float, order), *map(float, factors), float(grayscale),
                         float(blur), float(sigma)], dtype=torch.float32)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast one value per image."""
    return values.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with one ratio per image; ratio 1 returns ``x`` exactly."""
    ratio = _per_sample(ratio)
    return (ratio * x + (1.0 - ratio) * other).clamp(0, 1)


def blend_op(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation, chosen per image by ``op``: all three blend the image
    with a reference (black, the grey mean, the grey image), so one blend serves the batch."""
    gray = grayscale(x)
    op = _per_sample(op)
    reference = torch.where(op == BRIGHTNESS, 0.0,
                            torch.where(op == CONTRAST, gray.mean(dim=(1, 2, 3), keepdim=True), gray))
    return _blend(x, reference, factor)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's ``_rgb2hsv`` (grey pixels get hue and saturation 0, never NaN)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    grey = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    s = chroma / torch.where(grey, ones, maxc)
    divisor = torch.where(grey, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The closed form of torchvision's piecewise ``_hsv2rgb`` (same map, without its one-hot
    [6, B, 3, H, W] einsum): channel n of (r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1),
    k = (n + 6h) mod 6, n = 5, 3, 1."""
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * h, 6.0)
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(channels, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(torch.remainder(h + shift.view(-1, 1, 1), 1.0), s, v)


def color_jitter(x: torch.Tensor, apply: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` per image: ``order[b]`` lists the op ids in application order,
    ``factors[b]`` holds the four factors by op id, ``apply[b]`` switches the whole jitter.

    Hue, the costly op, runs once on the batch: first the blend ops each image has before its hue
    step, position by position, then hue, then the blend ops after it. A blend op that is not the
    image's at that position gets factor 1, the identity exactly.
    """
    hue_position = (order == HUE).float().argmax(1)
    for after_hue in (False, True):
        for position in range(1, 4) if after_hue else range(3):
            op = order[:, position]
            mine = (position > hue_position) if after_hue else (position < hue_position)
            factor = factors.gather(1, op.long().view(-1, 1)).view(-1)
            x = blend_op(x, op, torch.where(apply & mine, factor, 1.0))
        if not after_hue:
            x = torch.where(_per_sample(apply), adjust_hue(x, factors[:, HUE]), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """A Gaussian of standard deviation ``sigma[b]`` per image, sampled at offsets -radius..radius
    and normalised (torchvision's kernel for size 2 radius + 1), applied separably as grouped
    convolutions over reflect-padded rows, then columns."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)   # [B*C, K]
    size = 2 * radius + 1
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, size), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, size, 1), groups=b * c)
    return y.view(b, c, h, w)


class PhotometricAugment:
    """Finishes the views the workers shipped: ``student(uint8 images, params)`` runs jitter,
    grayscale, blur and normalisation; ``teacher(uint8 images)`` only normalises (the weak view
    has no photometric change). ``max_sigma`` is the largest blur sigma the workers draw; it fixes
    the kernel radius (3 sigma) so no shape depends on the data."""

    def __init__(self, max_sigma: float, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu"):
        self.radius = math.ceil(3 * max_sigma)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def teacher(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(images.float() / 255)

    def student(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        x = color_jitter(x, params[:, JITTER] > 0, params[:, ORDER], params[:, FACTORS])
        x = torch.where(_per_sample(params[:, GRAYSCALE] > 0), grayscale(x).expand_as(x), x)
        x = torch.where(_per_sample(params[:, BLUR] > 0), gaussian_blur(x, params[:, SIGMA], self.radius), x)
        return self.normalize(x)
