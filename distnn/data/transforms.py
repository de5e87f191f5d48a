"""Per-sample augmentation on uint8 tensors, driven by an explicit RNG.

Each sample's RNG is seeded from (seed, epoch, sample index), so augmentation does not depend
on which worker or rank reads the sample, nor on where a resumed run picks up. Conversion to
float and normalisation happen per batch on the device (data/prefetch.py).
"""

from __future__ import annotations

import math
import random

import torch
from torchvision.transforms.v2 import functional as F

# Images at most this size train with pad + random crop (CIFAR recipe); larger ones with
# random-resized crops (ImageNet recipe).
SMALL = 64
EVAL_CROP = 0.875


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-2:] == (size, size):
        return img
    return F.resize(img, [size, size], antialias=True)


def _flip(img: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return F.horizontal_flip(img) if rng.random() < 0.5 else img


def _pad_crop(img: torch.Tensor, size: int, rng: random.Random, pad: int = 4) -> torch.Tensor:
    img = F.pad(_fit(img, size), [pad])
    top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    return img[:, top : top + size, left : left + size]


def _random_resized_crop(
    img: torch.Tensor,
    size: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    # The Inception-style crop torchvision's RandomResizedCrop draws, from our RNG.
    height, width = img.shape[-2:]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    # Fallback: the largest centred crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return F.resized_crop(img, top, left, h, w, [size, size], antialias=True)


class TrainTransform:
    """Augment sample `index` of `epoch`. A class, not a closure: workers may be spawned."""

    def __init__(self, size: int, seed: int, hflip: bool = True) -> None:
        self.size, self.seed, self.hflip = size, seed, hflip

    def __call__(self, img: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        if self.size <= SMALL:
            img = _pad_crop(img, self.size, rng)
        else:
            img = _random_resized_crop(img, self.size, rng)
        return _flip(img, rng) if self.hflip else img


class EvalTransform:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor, index: int = 0, epoch: int = 0) -> torch.Tensor:
        if self.size <= SMALL:
            return _fit(img, self.size)
        resized = F.resize(img, round(self.size / EVAL_CROP), antialias=True)
        return F.center_crop(resized, [self.size, self.size])
