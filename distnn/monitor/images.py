"""One grid of training images, as the model sees them but with the normalisation undone."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def grid(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], max_images: int = 64
) -> np.ndarray:
    """H × W × 3 uint8 grid of the first `max_images` of a normalised N × 3 × h × w batch
    (augmentations included: crops and flips show)."""
    from torchvision.utils import make_grid

    x = x[:max_images].detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    # The loader scales 0..255 pixels by the mean/std of 0..255 values (see data.prefetch).
    pixels = (x * std_t + mean_t).clamp(0, 255).round().to(torch.uint8)
    nrow = max(1, math.ceil(math.sqrt(len(pixels))))
    return make_grid(pixels, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
