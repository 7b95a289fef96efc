"""The CGH student/teacher: a torchvision ResNet with a global and a hypercolumn branch.

Student (online network): backbone -> pooled feature -> global projector (-> predictor for
CGH-pred) -> ``z^g``; chosen stage outputs -> ``HypercolumnHead`` -> ``z^h``. The teacher is an
exponential moving average of the student (backbone, global projector, hypercolumn branch; not
the predictor), never receives gradients, and fills the two queues with its embeddings.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cgh.backbone import ARCHS, build_backbone, feature_dim
from cgh.batchnorm import (batch_shuffle_ddp, batch_shuffle_single, batch_unshuffle_ddp,
                           batch_unshuffle_single, check_split_order, convert_split_batchnorm)
from cgh.errors import CghError
from cgh.queue import DualQueue, validate_queue

STAGES = ("layer1", "layer2", "layer3", "layer4")
TEACHER_BN = ("split", "shuffle", "plain")


def stage_channels(arch: str) -> dict[str, int]:
    """Output channels of each residual stage (64..512 for basic blocks, 256..2048 bottleneck)."""
    if arch not in ARCHS:
        build_backbone(arch)  # raises the ArchError that lists the supported names
    base = 256 if ARCHS[arch][1] else 64
    return {name: base * 2 ** i for i, name in enumerate(STAGES)}


def check_layers(layers) -> tuple[str, ...]:
    """Validate a subset of ``layer1..layer4`` (list, tuple or comma-separated string) and return
    it in network order (the last one sets the hypercolumn's spatial size)."""
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    layers = list(layers)
    unknown = [name for name in layers if name not in STAGES]
    if unknown:
        raise CghError(f"unknown hypercolumn layer(s) {', '.join(map(repr, unknown))}; "
                       f"valid names: {', '.join(STAGES)}")
    if not layers:
        raise CghError(f"the hypercolumn needs at least one layer out of {', '.join(STAGES)}")
    return tuple(name for name in STAGES if name in layers)


def stage_features(resnet: nn.Module, x: torch.Tensor,
                   layers: tuple[str, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a torchvision ResNet: returns (pooled feature ``[B, C]``, outputs of ``layers`` in order)."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    maps = []
    for name in STAGES:
        x = getattr(resnet, name)(x)
        if name in layers:
            maps.append(x)
    return torch.flatten(resnet.avgpool(x), 1), maps


def _shrink_dim(x: torch.Tensor, dim: int, factor: int) -> torch.Tensor:
    """Bilinear (``align_corners=False``) shrinking of axis ``dim`` (-2 or -1) by an integer
    ``factor``: output ``i`` samples input coordinate ``factor * i + (factor - 1) / 2``, which is
    one input element for an odd factor and the mean of two neighbours for an even one."""
    if factor == 1:
        return x
    grid = x.unflatten(dim, (x.shape[dim] // factor, factor))   # the factor axis is now ``dim``
    centre = (factor - 1) // 2
    if factor % 2:
        return grid.select(dim, centre)
    return (grid.select(dim, centre) + grid.select(dim, centre + 1)) * 0.5


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, computed by strided slices
    when ``size`` divides the input's size (ResNet stages: 2x, 4x, 8x). The same numbers, but its
    backward is a strided add instead of interpolate's scatter (which took 1.5 ms per compiled R50
    step on an H100)."""
    height, width = x.shape[-2:]
    if (height, width) == tuple(size):
        return x
    if height % size[0] or width % size[1]:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return _shrink_dim(_shrink_dim(x, -2, height // size[0]), -1, width // size[1])


class ProjectionHead(nn.Sequential):
    """Two-layer MLP ``Linear -> ReLU -> Linear`` without BN, as ReSSL's and CGH's projectors."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 512):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class PredictionHead(nn.Sequential):
    """CGH-pred's predictor on the student's global embedding (as the revised ReSSL). The authors'
    release has no predictor code; this is the usual BYOL-style ``Linear -> BN -> ReLU -> Linear``."""

    def __init__(self, dim: int = 512, hidden_dim: int = 4096):
        super().__init__(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))


class HypercolumnHead(nn.Module):
    """Stage outputs -> hypercolumn embedding (unnormalised ``[B, out_dim]``).

    Each map is resized (bilinear, ``align_corners=False``) to the spatial size of the last one,
    the maps are concatenated on channels (the hypercolumn), then ``Conv1x1 (no bias) -> BN ->
    ReLU -> global average pool`` gives the hypercolumn context ``h^h`` and ``ProjectionHead``
    the embedding.
    """

    def __init__(self, in_channels: int, channels: int = 2048, hidden_dim: int = 4096,
                 out_dim: int = 512):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False),
                                    nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.projector = ProjectionHead(channels, hidden_dim, out_dim)

    @staticmethod
    def hypercolumn(maps: list[torch.Tensor]) -> torch.Tensor:
        """``[B, sum C_l, h, w]`` with ``(h, w)`` the size of the last map."""
        size = tuple(maps[-1].shape[-2:])
        return torch.cat([resize_bilinear(m, size) for m in maps], dim=1)

    def context(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The hypercolumn context ``h^h`` ``[B, channels]``."""
        return torch.flatten(F.adaptive_avg_pool2d(self.reduce(self.hypercolumn(maps)), 1), 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.projector(self.context(maps))


class CGHModel(nn.Module):
    """Student, EMA teacher and the two queues. ``forward`` returns everything ``cgh_loss`` needs.

    ``teacher_bn``: ``"split"`` (authors' single-device setup: every backbone BatchNorm of student
    and teacher computes its batch statistics over ``bn_splits`` groups, and the teacher's batch is
    shuffled on the device first, so its groups differ from the student's; ``bn_split_order``:
    which samples share a group, ``"interleaved"`` as the authors' ``SplitBatchNorm`` or
    ``"contiguous"`` blocks, see ``SplitBatchNorm2d``); ``"shuffle"`` (MoCo's
    shuffle-BN across processes under DDP; plain BN on one process); ``"plain"`` (no trick).
    ``hyper_channels``: width of the hypercolumn's 1x1 conv; ``None`` = the backbone's pooled width
    (2048 for ResNet-50, 512 for ResNet-18), as in the authors' code.
    """

    validate_queue = staticmethod(validate_queue)

    def __init__(self, arch: str = "resnet50", layers=("layer3", "layer4"), dim: int = 512,
                 hidden_dim: int = 4096, hyper_channels: int | None = None,
                 queue_size: int = 131072, predictor: bool = False, predictor_hidden: int = 4096,
                 teacher_bn: str = "split", bn_splits: int = 8, use_hypercolumn: bool = True,
                 bn_split_order: str = "interleaved"):
        super().__init__()
        if teacher_bn not in TEACHER_BN:
            raise CghError(f"unknown teacher_bn '{teacher_bn}'; expected one of {', '.join(TEACHER_BN)}")
        if bn_splits < 1:
            raise CghError(f"bn_splits must be >= 1 (got {bn_splits})")
        check_split_order(bn_split_order)
        self.arch, self.teacher_bn, self.use_hypercolumn = arch, teacher_bn, use_hypercolumn
        layers = check_layers(layers)  # validated even when unused, so a typo never goes unseen
        self.layers = layers if use_hypercolumn else ()

        self.student_backbone = build_backbone(arch)
        if teacher_bn == "split":
            convert_split_batchnorm(self.student_backbone, bn_splits, bn_split_order)
        width = feature_dim(arch)
        self.student_global_head = ProjectionHead(width, hidden_dim, dim)
        self.student_hyper_head = None
        if use_hypercolumn:
            channels = stage_channels(arch)
            self.student_hyper_head = HypercolumnHead(sum(channels[n] for n in self.layers),
                                                      hyper_channels or width, hidden_dim, dim)
        self.predictor = PredictionHead(dim, predictor_hidden) if predictor else None

        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_global_head = copy.deepcopy(self.student_global_head)
        self.teacher_hyper_head = copy.deepcopy(self.student_hyper_head)
        for module in self._teacher_modules():
            module.requires_grad_(False)

        self.queue = DualQueue(queue_size, dim, hyper=use_hypercolumn)

    def _student_modules(self) -> list[nn.Module]:
        return [m for m in (self.student_backbone, self.student_global_head, self.student_hyper_head)
                if m is not None]

    def _teacher_modules(self) -> list[nn.Module]:
        return [m for m in (self.teacher_backbone, self.teacher_global_head, self.teacher_hyper_head)
                if m is not None]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA (paper eq. 7): ``teacher <- m * teacher + (1 - m) * student`` for every parameter
        of the backbone, global projector and hypercolumn branch. Call once per step, before the
        forward pass. BatchNorm running statistics are the teacher's own, as in MoCo."""
        teacher = [p for m in self._teacher_modules() for p in m.parameters()]
        student = [p.detach() for m in self._student_modules() for p in m.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def _embed(self, backbone, global_head, hyper_head, x, with_hyper: bool):
        pooled, maps = stage_features(backbone, x, self.layers if with_hyper else ())
        z_global = global_head(pooled)
        z_hyper = hyper_head(maps) if with_hyper else None
        return z_global, z_hyper

    @torch.no_grad()
    def _teacher_embed(self, x: torch.Tensor):
        if self.teacher_bn == "shuffle":
            x, idx = batch_shuffle_ddp(x)
            unshuffle = batch_unshuffle_ddp
        elif self.teacher_bn == "split":
            x, idx = batch_shuffle_single(x)
            unshuffle = batch_unshuffle_single
        else:
            idx, unshuffle = None, None
        z_global, z_hyper = self._embed(self.teacher_backbone, self.teacher_global_head,
                                        self.teacher_hyper_head, x, self.use_hypercolumn)
        z_global = F.normalize(z_global.float(), dim=1)
        z_hyper = None if z_hyper is None else F.normalize(z_hyper.float(), dim=1)
        if unshuffle is not None:
            z_global = unshuffle(z_global, idx)
            z_hyper = None if z_hyper is None else unshuffle(z_hyper, idx)
        return z_global, z_hyper

    def _student_embed(self, x: torch.Tensor, with_hyper: bool):
        z_global, z_hyper = self._embed(self.student_backbone, self.student_global_head,
                                        self.student_hyper_head, x, with_hyper)
        if self.predictor is not None:
            z_global = self.predictor(z_global)
        z_global = F.normalize(z_global.float(), dim=1)
        return z_global, (None if z_hyper is None else F.normalize(z_hyper.float(), dim=1))

    def forward(self, student_views, teacher_view: torch.Tensor, labels: torch.Tensor | None = None,
                indices: torch.Tensor | None = None) -> dict:
        """One step. ``student_views``: the strong view ``[B, 3, H, W]`` first, then any
        multi-crop small views (global branch only); ``teacher_view``: the weak view.
        ``labels``/``indices`` ``[B]`` are only stored in the queue (for the positive-selection
        metric), never used by the loss.

        Returns ``student_global`` (list, one ``[B, dim]`` per view), ``student_hyper`` (list with
        the main view's ``[B, dim]``; empty without the hypercolumn branch), ``teacher_global``,
        ``teacher_hyper`` (``[B, dim]`` or None), ``queue_global``/``queue_hyper``
        (``[K, dim]`` snapshots taken before this batch is enqueued), ``queue_labels``,
        ``queue_indices`` ``[K]``, ``batch_labels``, ``batch_indices`` ``[B]``. All embeddings
        are L2-normalised float32. This batch's teacher keys are enqueued afterwards.
        """
        if isinstance(student_views, torch.Tensor):
            student_views = [student_views]
        batch = teacher_view.shape[0]
        for v in student_views:
            if v.shape[0] != batch:
                raise CghError(f"every student view must have the teacher's batch size {batch} "
                               f"(got {v.shape[0]})")
        if labels is None:
            labels = torch.full((batch,), -1, dtype=torch.long, device=teacher_view.device)
        if indices is None:
            indices = torch.full((batch,), -1, dtype=torch.long, device=teacher_view.device)

        teacher_global, teacher_hyper = self._teacher_embed(teacher_view)
        student_global, student_hyper = [], []
        for i, view in enumerate(student_views):
            z_global, z_hyper = self._student_embed(view, self.use_hypercolumn and i == 0)
            student_global.append(z_global)
            if z_hyper is not None:
                student_hyper.append(z_hyper)

        out = {"student_global": student_global, "student_hyper": student_hyper,
               "teacher_global": teacher_global, "teacher_hyper": teacher_hyper,
               **self.queue.snapshot(), "batch_labels": labels, "batch_indices": indices}
        self.queue.enqueue(teacher_global, teacher_hyper, labels, indices)
        return out
