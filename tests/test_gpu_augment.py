"""GPU augmentation (``cgh.gpu_augment`` + the workers' half in ``cgh.transforms``), on CPU.

Each batched op equals torchvision's per-sample functional with the same parameters; the per-sample
order and the p-masks are honoured; the workers draw torchvision's distributions, reproducibly; the
views collate and finish like the CPU path's; and ``data.gpu_augment`` is wired into a run that
trains and resumes bitwise exactly.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import default_collate

from _helpers_trainer import check_sigkill_resume_is_bitwise_identical
from cgh import gpu_augment as G
from cgh.errors import CghError
from cgh.train import DataConfig, build_gpu_augment, build_transform, resolve_gpu_augment, views_on_device
from cgh.transforms import (IMAGENET_MEAN, IMAGENET_STD, CropFlip, MultiCropTransform, PhotometricParams,
                            TwoViewTransform, blur_sigma, teacher_transform)

B = 6


def _images(seed: int = 0) -> torch.Tensor:
    """[B, 3, 20, 24] in [0, 1] with the HSV corner cases: grey pixels and tied channels."""
    x = torch.rand(B, 3, 20, 24, generator=torch.Generator().manual_seed(seed))
    x[0, :, :4] = 0.5
    x[1] = (x[1] * 4).round() / 4
    return x


def _factors(seed: int = 1) -> torch.Tensor:
    """[B, 4]: brightness, contrast, saturation in [0.6, 1.4], hue in [-0.1, 0.1], as ColorJitter."""
    g = torch.Generator().manual_seed(seed)
    f = torch.empty(B, 4).uniform_(0.6, 1.4, generator=g)
    f[:, G.HUE] = torch.empty(B).uniform_(-0.1, 0.1, generator=g)
    return f


REFERENCE = {G.BRIGHTNESS: TF.adjust_brightness, G.CONTRAST: TF.adjust_contrast,
             G.SATURATION: TF.adjust_saturation, G.HUE: TF.adjust_hue}


def _batched(op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if op == G.HUE:
        return G.adjust_hue(x, factor)
    return G.blend_op(x, torch.full((len(x),), float(op)), factor)


def _augment(max_sigma: float = 2.0) -> G.PhotometricAugment:
    return G.PhotometricAugment(max_sigma, IMAGENET_MEAN, IMAGENET_STD)


# ------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("op, atol", [(G.BRIGHTNESS, 1e-6), (G.CONTRAST, 1e-6), (G.SATURATION, 1e-6),
                                      (G.HUE, 1e-5)])
def test_each_jitter_op_equals_torchvision_per_sample(op, atol):
    x, f = _images(), _factors()
    out = _batched(op, x, f[:, op])
    ref = torch.stack([REFERENCE[op](x[b], float(f[b, op])) for b in range(B)])
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    assert not torch.allclose(out, x, atol=1e-3)   # the factors do change the images


def test_grayscale_equals_torchvision():
    x = _images()
    torch.testing.assert_close(G.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_jitter_follows_each_samples_order_and_mask():
    x, f = _images(), _factors()
    orders = torch.tensor([[3, 0, 1, 2], [0, 1, 2, 3], [2, 3, 1, 0], [1, 2, 3, 0], [3, 2, 1, 0], [0, 3, 2, 1]])
    apply = torch.tensor([True, True, True, True, True, False])
    out = G.color_jitter(x, apply, orders.float(), f)
    for b in range(B - 1):
        ref = x[b]
        for op in orders[b].tolist():
            ref = REFERENCE[op](ref, float(f[b, op]))
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)
    assert torch.equal(out[B - 1], x[B - 1])   # jitter off: untouched, bit for bit
    # the order matters, so the check above can fail: sample 0 in the default order differs
    default = G.color_jitter(x[:1], apply[:1], torch.arange(4.0).view(1, 4), f[:1])
    assert (default - out[:1]).abs().max() > 1e-3


def _reference_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """One image, direct 2-D convolution with the outer product of the sampled 1-D Gaussian."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k1 = k1 / k1.sum()
    k2 = (k1[:, None] * k1[None, :]).expand(3, 1, -1, -1)
    padded = F.pad(x[None].double(), (radius,) * 4, mode="reflect")
    return F.conv2d(padded, k2, groups=3)[0].float()


def test_blur_equals_direct_2d_convolution_and_torchvision():
    x = _images()
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.3, 1.7, 2.0])
    radius = _augment(2.0).radius
    assert radius == 6   # 3 sigma of the range's largest sigma
    out = G.gaussian_blur(x, sigma, radius)
    for b in range(B):
        torch.testing.assert_close(out[b], _reference_blur(x[b], float(sigma[b]), radius), atol=1e-6, rtol=0)
        ref = TF.gaussian_blur(x[b], [2 * radius + 1] * 2, [float(sigma[b])] * 2)
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=0)
    assert (out[-1] - x[-1]).abs().max() > 0.1   # sigma 2 does blur


def test_blur_is_pils_within_two_grey_levels_away_from_the_border():
    """The CPU path's ``ImageFilter.GaussianBlur(radius)`` (three box blurs, edge pixels repeated)
    against the sampled Gaussian over reflect padding: same strength; borders differ more."""
    yy, xx = np.mgrid[0:64, 0:64]
    array = np.stack([(xx * 4) % 256, (yy * 3) % 256, ((xx + yy) > 64) * 200 + 20], -1).astype(np.uint8)
    image = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    for sigma in (0.5, 1.0, 2.0):
        pil = np.asarray(Image.fromarray(array).filter(ImageFilter.GaussianBlur(sigma)))
        pil = torch.from_numpy(pil.copy()).permute(2, 0, 1)[None].float() / 255
        ours = G.gaussian_blur(image, torch.tensor([sigma]), 6)
        gap = (ours - pil).abs() * 255
        assert gap[..., 8:-8, 8:-8].max() <= 2.0 and gap.mean() < 0.5, sigma
        assert (ours - image).abs().max() * 255 > 10   # and it really blurs (the edge)


# ------------------------------------------------------------------------------- the whole view
def _params(n: int, jitter=0, gray=0, blur=0, sigma=1.0) -> torch.Tensor:
    rows = [G.pack_params(jitter, [0, 1, 2, 3], [1.3, 0.7, 1.2, 0.05], gray, blur, sigma) for _ in range(n)]
    return torch.stack(rows)


def test_student_with_every_op_off_is_the_teacher_normalisation():
    images = (_images() * 255).round().to(torch.uint8)
    aug = _augment()
    plain = aug.student(images, _params(B))
    assert torch.equal(plain, aug.teacher(images))
    # which equals torchvision's ToTensor + Normalize
    ref = TF.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(plain, ref, atol=1e-6, rtol=0)


def test_student_applies_grayscale_and_blur_where_their_masks_are_on():
    images = (_images() * 255).round().to(torch.uint8)
    x = images.float() / 255
    aug = _augment()
    params = _params(B, sigma=1.5)
    params[::2, G.GRAYSCALE] = 1
    params[1::2, G.BLUR] = 1
    out = aug.student(images, params)
    gray = aug.normalize(TF.rgb_to_grayscale(x, num_output_channels=3))
    blurred = aug.normalize(G.gaussian_blur(x, torch.full((B,), 1.5), aug.radius))
    torch.testing.assert_close(out[::2], gray[::2], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1::2], blurred[1::2], atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    device = torch.device("cuda")
    aug = G.PhotometricAugment(2.0, IMAGENET_MEAN, IMAGENET_STD, device)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, device=device)
    params = _params(8, jitter=1, blur=1).to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug.student(images, params)
        aug.teacher(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------- the workers' half
def _draw(n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    random.seed(seed)
    draw = PhotometricParams(blur_sigma(224))
    return torch.stack([draw() for _ in range(n)])


def test_parameter_draws_reproduce_and_follow_torchvisions_distributions():
    n = 3000
    p = _draw(n, 0)
    assert torch.equal(p, _draw(n, 0)) and not torch.equal(p, _draw(n, 1))
    assert p.shape == (n, G.NUM_PARAMS) and p.dtype == torch.float32
    for column, prob in ((G.JITTER, 0.8), (G.GRAYSCALE, 0.2), (G.BLUR, 0.5)):
        bound = 5 * math.sqrt(n * prob * (1 - prob))   # loose binomial bound
        assert abs(p[:, column].sum() - n * prob) < bound, column
    assert torch.equal(p[:, G.ORDER].sort(1).values, torch.arange(4.0).expand(n, 4))   # permutations
    assert len({tuple(o) for o in p[:, G.ORDER].tolist()}) == 24                        # all of them
    factors = p[:, G.FACTORS]
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4
    assert factors[:, G.HUE].min() >= -0.1 and factors[:, G.HUE].max() <= 0.1
    assert factors.std(0).min() > 0.05                                                  # really random
    assert p[:, G.SIGMA].min() >= 0.1 and p[:, G.SIGMA].max() <= 2.0


def test_gpu_teacher_view_equals_the_cpu_one_for_the_same_draws():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    torch.manual_seed(3)
    cpu = teacher_transform(24)(img)
    torch.manual_seed(3)
    gpu = _augment().teacher(teacher_transform(24, gpu_augment=True)(img)[None])[0]
    torch.testing.assert_close(gpu, cpu, atol=1e-6, rtol=0)


@pytest.mark.parametrize("smooth", [False, True])
def test_tensor_crop_flip_is_the_pil_one_for_the_same_draws(smooth):
    """``CropFlip`` on a decoded uint8 tensor (the GPU path's files) crops the same box, flips the
    same way and consumes the same random numbers as on the PIL image; torch's antialiased
    bilinear resize is within one grey level of PIL's (noise and smooth images, 40 draws)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    if smooth:
        pixels = np.asarray(Image.fromarray(pixels[:8, :10]).resize((90, 70), Image.BICUBIC))
    pil, tensor = Image.fromarray(pixels), torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    crop_flip = CropFlip(32, (0.2, 1.0))
    for seed in range(40):
        torch.manual_seed(seed)
        want, next_want = crop_flip(pil), torch.rand(1)
        torch.manual_seed(seed)
        got, next_got = crop_flip(tensor), torch.rand(1)
        assert got.dtype == torch.uint8 and got.shape == want.shape == (3, 32, 32)
        assert int((got.int() - want.int()).abs().max()) <= 1, seed
        assert torch.equal(next_got, next_want)


def test_multi_crop_small_views_draw_the_main_views_blur_range():
    multi = MultiCropTransform(size=64, gpu_augment=True)
    assert {t.params.blur.sigma for t in multi.small} == {blur_sigma(64)}
    assert multi.main.student.params.blur.sigma == blur_sigma(64)


# ------------------------------------------------------------------------------- worker -> collate -> device
@pytest.mark.parametrize("multi_crop", [False, True])
def test_gpu_path_batches_look_like_the_cpu_paths(multi_crop):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 80, 3), dtype=np.uint8))
    cfg = DataConfig(root="", image_size=32, multi_crop=multi_crop)
    torch.manual_seed(0)
    cpu_students, cpu_teacher = default_collate([build_transform(cfg)(img) for _ in range(4)])
    shipped = default_collate([build_transform(cfg, gpu_augment=True)(img) for _ in range(4)])
    assert all(images.dtype == torch.uint8 and params.shape == (4, G.NUM_PARAMS) for images, params in shipped[0])
    assert shipped[1].dtype == torch.uint8
    students, teacher = views_on_device(*shipped, torch.device("cpu"), build_gpu_augment(cfg, torch.device("cpu")))
    assert [s.shape for s in students] == [s.shape for s in cpu_students] and teacher.shape == cpu_teacher.shape
    lo = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    for view in students + [teacher]:
        assert view.dtype == torch.float32
        assert bool(((view >= lo - 1e-5) & (view <= hi + 1e-5)).all())


# ------------------------------------------------------------------------------- the setting
def test_gpu_augment_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not resolve_gpu_augment(DataConfig(root=""), cpu) and resolve_gpu_augment(DataConfig(root=""), cuda)
    assert resolve_gpu_augment(DataConfig(root="", gpu_augment="True"), cpu)   # a YAML/CLI boolean
    assert not resolve_gpu_augment(DataConfig(root="", gpu_augment="false"), cuda)
    with pytest.raises(CghError, match=r"data.gpu_augment 'gpu'.*auto, true or false"):
        resolve_gpu_augment(DataConfig(root="", gpu_augment="gpu"), cpu)


def test_gpu_augment_false_keeps_the_cpu_transform():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    transform = build_transform(DataConfig(root="", image_size=32, gpu_augment="false"))
    assert type(transform) is TwoViewTransform
    torch.manual_seed(5)
    random.seed(5)
    (built,), built_teacher = transform(img)
    torch.manual_seed(5)
    random.seed(5)
    (direct,), direct_teacher = TwoViewTransform(32, (0.2, 1.0))(img)
    assert torch.equal(built, direct) and torch.equal(built_teacher, direct_teacher)


def test_invalid_gpu_augment_stops_a_run_before_it_starts(tmp_path):
    from cgh.train import load_pretrain_config, pretrain

    cfg = load_pretrain_config("pretrain/demo_synth", [f"data.root={tmp_path}", f"output_dir={tmp_path / 'o'}",
                                                       "data.gpu_augment=sometimes"])
    with pytest.raises(CghError, match="data.gpu_augment 'sometimes'"):
        pretrain(cfg)
    assert not (tmp_path / "o").exists()


def test_run_with_gpu_augment_on_cpu_trains_and_resumes_exactly(tmp_path):
    rows = check_sigkill_resume_is_bitwise_identical(tmp_path, "data.gpu_augment=true")
    assert all(math.isfinite(float(r["loss"])) for r in rows)
