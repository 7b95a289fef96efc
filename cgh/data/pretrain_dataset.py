"""The pretraining dataset: each item is (views, label, index, skipped), robust to corrupt images.

Labels are never used by the loss; they ride along so the queue can store them for the
positive-selection metric (paper Fig. 2). ``index`` is the dataset index of the image actually
returned. A corrupt or truncated file is, by default, replaced by the next readable image
(``index + 1``, ``index + 2``, ... modulo the dataset size): the choice depends only on the index,
so the data order stays reproducible and the batch keeps its size; ``skipped`` counts the files
passed over for this item, and the trainer sums it into the run's log. ``strict_images=True``
makes the first corrupt file fatal instead.
"""
from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset

from cgh.errors import DatasetError

MAX_CONSECUTIVE_CORRUPT = 64


class PretrainDataset(Dataset):
    """Wrap a classification dataset built with ``transform=None`` and apply the two-view transform.

    ``base`` is an ImageFolder-like dataset (``.samples`` of (path, label): files are opened here
    through ``cgh.data.datasets.open_image`` so corruption is detected) or any dataset yielding
    (PIL image, label) (in-memory formats such as STL-10 or CIFAR cannot hold corrupt files).
    ``tensor_images``: files are decoded to uint8 tensors (``decode_image_tensor``) instead of PIL
    images, for the GPU augmentation path, whose worker transforms take either.
    """

    def __init__(self, base: Dataset, transform: Callable, strict_images: bool = False,
                 tensor_images: bool = False):
        self.base = base
        self.transform = transform
        self.strict_images = strict_images
        self.tensor_images = tensor_images
        self.samples = getattr(base, "samples", None)
        self.targets = [int(t) for t in getattr(base, "targets", [s[1] for s in self.samples or []])]
        self.classes = list(getattr(base, "classes", []))

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int):
        if self.samples is None:
            image, label = self.base[index]
            return image, int(label)
        from cgh.data.datasets import decode_image_tensor, open_image

        path, label = self.samples[index]
        return (decode_image_tensor if self.tensor_images else open_image)(path), int(label)

    def __getitem__(self, index: int):
        from cgh.data.datasets import CorruptImageError

        n = len(self)
        for skipped in range(min(n, MAX_CONSECUTIVE_CORRUPT)):
            i = (index + skipped) % n
            try:
                image, label = self._load(i)
            except CorruptImageError as e:
                if self.strict_images:
                    raise DatasetError(f"{e} (strict_images=true; set data.strict_images=false to skip "
                                       f"corrupt images and count them)") from None
                continue
            return self.transform(image), label, i, skipped
        raise DatasetError(f"{min(n, MAX_CONSECUTIVE_CORRUPT)} consecutive images from index {index} "
                           f"are corrupt; the dataset looks damaged")


class SkipCorruptDataset(PretrainDataset):
    """(transform(image), label) with the same corrupt-image replacement, for the kNN monitor's
    splits: a damaged file in the memory bank must not stop a long pretraining run."""

    def __getitem__(self, index: int):
        return super().__getitem__(index)[:2]
