"""Train and eval transforms: decoded uint8 images → uint8 batches, driven by explicit RNGs.

Each sample's RNG is seeded from (seed, epoch, sample index), so augmentation does not depend
on which worker or rank reads the sample, on the batch it is read in, nor on where a resumed
run picks up. Conversion to float and normalisation happen per batch on the device
(data/prefetch.py); the policies after crop + flip are in data/augment.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from distnn.config import DataConfig
from distnn.data.augment import SMALL, Augment

PAD = 4
EVAL_CROP = 0.875


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-2:] == (size, size):
        return img
    return F.resize(img, [size, size], antialias=True)


def _chw(img: np.ndarray) -> torch.Tensor:
    """An H × W × 3 uint8 array as a 3 × H × W tensor (a view where torch may write to it)."""
    return torch.from_numpy(img if img.flags.writeable else np.array(img)).permute(2, 0, 1)


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).numpy()


def _flip(img: torch.Tensor, rng: random.Random) -> torch.Tensor:
    return F.horizontal_flip(img) if rng.random() < 0.5 else img


def _pad_crop_flip(
    images: Sequence[np.ndarray], rngs: Sequence[random.Random], size: int, hflip: bool
) -> torch.Tensor:
    """The CIFAR recipe (zero-pad 4, random crop, random flip) for H × W × 3 images at `size`:
    in the decoder's HWC layout on one padded buffer, then one transpose for the batch, as
    per-sample tensor ops cost more than the pixel work at 32 px."""
    n, pad = len(images), PAD
    padded = np.zeros((n, size + 2 * pad, size + 2 * pad, 3), np.uint8)
    out = np.empty((n, size, size, 3), np.uint8)
    for k, (img, rng) in enumerate(zip(images, rngs, strict=True)):
        padded[k, pad : pad + size, pad : pad + size] = img
        top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
        crop = padded[k, top : top + size, left : left + size]
        out[k] = crop[:, ::-1] if hflip and rng.random() < 0.5 else crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


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
    """Augment sample `index` of `epoch`. A class, not a closure: workers may be spawned.

    `batch` is the one augmentation path; calling the transform on one image runs it on a
    batch of one, so both give the same pixels for the same (image, index, epoch)."""

    def __init__(
        self, size: int, seed: int, hflip: bool = True, augment: Augment | None = None
    ) -> None:
        self.size, self.seed, self.hflip, self.augment = size, seed, hflip, augment

    def __call__(self, img: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        return self.batch([_hwc(img)], [index], epoch)[0]

    def batch(
        self, images: Sequence[np.ndarray], indices: Sequence[int], epoch: int
    ) -> torch.Tensor:
        """H × W × 3 uint8 images, sample `indices[j]` each → N × 3 × S × S uint8."""
        s = self.size
        rngs = [random.Random(f"{self.seed}:{epoch}:{i}") for i in indices]
        if s <= SMALL:
            fitted = [
                img if img.shape[:2] == (s, s) else _hwc(_fit(_chw(img), s)) for img in images
            ]
            x = _pad_crop_flip(fitted, rngs, s, self.hflip)
        else:
            x = torch.empty(len(images), 3, s, s, dtype=torch.uint8)
            for j, (img, rng) in enumerate(zip(images, rngs, strict=True)):
                crop = _random_resized_crop(_chw(img), s, rng)
                x[j] = _flip(crop, rng) if self.hflip else crop
        if self.augment is not None:
            self.augment(x, rngs)
        return x


class EvalTransform:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor, index: int = 0, epoch: int = 0) -> torch.Tensor:
        if self.size <= SMALL:
            return _fit(img, self.size)
        resized = F.resize(img, round(self.size / EVAL_CROP), antialias=True)
        return F.center_crop(resized, [self.size, self.size])

    def batch(
        self, images: Sequence[np.ndarray], indices: Sequence[int] = (), epoch: int = 0
    ) -> torch.Tensor:
        """H × W × 3 uint8 images → N × 3 × S × S uint8 (indices and epoch: as TrainTransform)."""
        s = self.size
        x = torch.empty(len(images), 3, s, s, dtype=torch.uint8)
        # Images stored at the size (CIFAR, digits) need nothing but one transpose together.
        stored = [j for j, img in enumerate(images) if s <= SMALL and img.shape[:2] == (s, s)]
        if stored:
            x[stored] = torch.from_numpy(np.stack([images[j] for j in stored])).permute(0, 3, 1, 2)
        for j in sorted(set(range(len(images))) - set(stored)):
            x[j] = self(_chw(images[j]))
        return x


def for_config(
    d: DataConfig, seed: int, mean: Sequence[float]
) -> tuple[TrainTransform, EvalTransform]:
    """The train and eval transforms of `data.*` for a dataset of mean `mean` (every source)."""
    train = TrainTransform(d.image_size, seed, d.hflip, Augment.from_config(d, mean))
    return train, EvalTransform(d.image_size)
