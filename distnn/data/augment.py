"""Augmentation after crop + flip: torchvision's policies, colour jitter and random erasing.

torchvision draws from torch's global RNG. Each sample's draws are seeded from its own RNG
(seed, epoch, sample index), so they stay a pure function of the sample, as the crop and flip
are; the global RNG is saved and restored around each batch, so the caller's draws (dropout,
when data.workers=0 reads batches in the training process) do not depend on augmentation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2

if TYPE_CHECKING:
    from distnn.config import DataConfig

# Images at most this size are CIFAR-like: they train with pad + random crop (transforms.py) and
# get CIFAR-10's AutoAugment policy; larger ones the ImageNet recipe.
SMALL = 64

# data.augment's policies by name: (image size, ops, magnitude) -> torchvision's transform.
POLICIES: dict[str, Callable[[int, int, int], torch.nn.Module]] = {
    "randaugment": lambda size, ops, magnitude: v2.RandAugment(
        ops, magnitude, num_magnitude_bins=31
    ),
    "trivialaugment": lambda size, ops, magnitude: v2.TrivialAugmentWide(),
    # CIFAR-10's learned policy for CIFAR-sized images, ImageNet's for the others.
    "autoaugment": lambda size, ops, magnitude: v2.AutoAugment(
        v2.AutoAugmentPolicy.CIFAR10 if size <= SMALL else v2.AutoAugmentPolicy.IMAGENET
    ),
    "augmix": lambda size, ops, magnitude: v2.AugMix(severity=magnitude),
}


class Augment:
    """The steps `data.augment`, `data.color_jitter` and `data.random_erasing` add, in timm's
    order: policy, jitter, then erasing. A plain object of torchvision modules: it pickles, for
    spawned workers."""

    def __init__(
        self,
        size: int,
        policy: str = "basic",
        ops: int = 2,
        magnitude: int = 9,
        jitter: float = 0.0,
        erasing: float = 0.0,
        fill: Sequence[int] = (0, 0, 0),
    ) -> None:
        steps: list[torch.nn.Module] = []
        if policy != "basic":
            steps.append(POLICIES[policy](size, ops, magnitude))
        if jitter > 0:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        if erasing > 0:
            # The reference recipes erase after Normalize with 0; before it, on uint8, that value
            # is the dataset mean.
            steps.append(v2.RandomErasing(erasing, value=list(fill)))
        self.steps = v2.Compose(steps)

    @classmethod
    def from_config(cls, d: DataConfig, mean: Sequence[float]) -> Augment | None:
        """The config's steps, or None where it adds nothing to crop + flip."""
        if d.augment == "basic" and d.color_jitter == 0 and d.random_erasing == 0:
            return None
        return cls(
            d.image_size,
            d.augment,
            d.augment_ops,
            d.augment_magnitude,
            d.color_jitter,
            d.random_erasing,
            fill=[round(m) for m in mean],
        )

    def __call__(self, x: torch.Tensor, rngs: Sequence[random.Random]) -> None:
        """Augment each row of x (N × 3 × S × S uint8) in place, row j seeded from rngs[j]."""
        # Saved and restored once per batch, not per sample: it costs more than the seeding.
        # Only the CPU generator is seeded: torch.manual_seed would reseed CUDA's as well.
        with torch.random.fork_rng(devices=[]):
            for j, rng in enumerate(rngs):
                torch.default_generator.manual_seed(rng.getrandbits(63))
                x[j] = self.steps(x[j])
