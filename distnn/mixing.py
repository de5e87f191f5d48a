"""What a training batch is scored against: MixUp and CutMix (timm's Mixup, label smoothing
folded into its soft targets) and the loss, the seam the engine calls.

timm draws the mix from numpy's global RNG. Each micro-batch draws it from a state seeded by
(seed, step, micro-batch, rank) and then puts the global state back, so that a resumed run
mixes exactly as the uninterrupted one did and nothing else's random numbers move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distnn.config import TrainConfig
from distnn.errors import UserError


@dataclass
class Mixer:
    """MixUp/CutMix of each micro-batch with itself reversed, on the device (timm's
    batch mode): images mixed in place, targets the matching class probabilities."""

    cfg: TrainConfig
    num_classes: int
    rank: int

    def __post_init__(self) -> None:
        from timm.data import Mixup

        t = self.cfg
        self.mixup = Mixup(
            mixup_alpha=t.mixup_alpha,
            cutmix_alpha=t.cutmix_alpha,
            prob=t.mix_prob,
            switch_prob=t.mix_switch_prob,
            label_smoothing=t.label_smoothing,
            num_classes=self.num_classes,
        )

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, step: int, micro: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `micro` of optimizer step `step` (counted from 0), mixed."""
        outside = np.random.get_state()
        np.random.seed([v % 2**32 for v in (self.cfg.seed, step, micro, self.rank)])
        try:
            return self.mixup(x, y)
        finally:
            np.random.set_state(outside)


def build_mixer(cfg: TrainConfig, num_classes: int, rank: int) -> Mixer | None:
    """The run's Mixer, or None where neither MixUp nor CutMix is on. Checked before any
    process group forms."""
    if not (cfg.mixup_alpha or cfg.cutmix_alpha):
        return None
    if cfg.batch_size % 2:
        raise UserError(
            "train.mixup_alpha/cutmix_alpha mix each micro-batch with itself reversed and need "
            f"an even per-process train.batch_size, got {cfg.batch_size}"
        )
    return Mixer(cfg, num_classes, rank)


def build_loss(cfg: TrainConfig) -> nn.Module:
    """Cross-entropy; against class probabilities where the batch is mixed (its targets carry
    the label smoothing already), else against labels with train.label_smoothing."""
    mixed = cfg.mixup_alpha or cfg.cutmix_alpha
    return nn.CrossEntropyLoss(label_smoothing=0.0 if mixed else cfg.label_smoothing)
