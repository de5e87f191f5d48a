"""Optimizers and LR schedules, counted in optimizer steps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distnn.config import OptimConfig, SchedConfig
from distnn.errors import UserError


def param_groups(
    model: nn.Module, weight_decay: float, head: str = "", head_lr: float | None = None
) -> list[dict]:
    """Trainable parameters by weight decay and, where the head trains at its own rate, by
    head. Frozen ones (requires_grad False) are left out."""
    # Decaying norm scales and biases hurts accuracy and buys no regularisation: every 0-d or
    # 1-d parameter (BN/LN weights, biases) goes in a no-decay group.
    split_head = head_lr is not None
    if split_head and not head:
        raise UserError(
            "optim.head_lr_scale needs the classifier head and none was found "
            "(no final layer with num_classes outputs): name it with model.head"
        )
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            in_head = split_head and (name == head or name.startswith(head + "."))
            groups.setdefault((in_head, p.ndim <= 1), []).append(p)
    return [
        {
            "params": groups.get((in_head, no_decay), []),
            "weight_decay": 0.0 if no_decay else weight_decay,
            **({"lr": head_lr} if in_head else {}),
        }
        for in_head in ((False, True) if split_head else (False,))
        for no_decay in (False, True)
    ]


_OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda groups, c: torch.optim.SGD(
        groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0
    ),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps),
}


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / cfg.base_batch if cfg.scale_lr else cfg.lr


# A fused AdamW a strategy may put in torch's place: (groups, lr=, betas=, eps=) -> optimizer.
AdamW = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class Optimizers:
    """The run's optimizer, built by the strategy over the parameters it exposes once it has
    wrapped or sharded the model (a sharded model's parameters are not the built ones)."""

    cfg: OptimConfig
    global_batch: int
    head: str = ""  # the classifier's module name, for optim.head_lr_scale

    @property
    def lr(self) -> float:
        return peak_lr(self.cfg, self.global_batch)

    def groups(self, model: nn.Module) -> list[dict]:
        scale = self.cfg.head_lr_scale
        head_lr = self.lr * scale if scale != 1.0 else None
        return param_groups(model, self.cfg.weight_decay, self.head, head_lr)

    def __call__(self, model: nn.Module, adamw: AdamW | None = None) -> torch.optim.Optimizer:
        cfg = dataclasses.replace(self.cfg, lr=self.lr)
        if adamw is not None and cfg.name == "adamw":
            return adamw(self.groups(model), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        return _OPTIMIZERS[cfg.name](self.groups(model), cfg)


# Each schedule maps (steps since warmup, steps to decay over, config) to an LR multiplier.
_SCHEDULES: dict[str, Callable[[int, int, SchedConfig], float]] = {
    "cosine": lambda t, n, c: (
        c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / n)))
    ),
    "step": lambda t, n, c: c.gamma ** (t // (c.step_size or max(1, n // 3))),
    "constant": lambda t, n, c: 1.0,
}


def lr_factor(cfg: SchedConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step `step`: linear warmup, then the schedule."""
    warmup, schedule = cfg.warmup_steps, _SCHEDULES[cfg.name]
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return schedule(step - warmup, decay_steps, cfg)

    return factor


@dataclass(frozen=True)
class Schedule:
    """The LR schedule over `total_steps` optimizer steps, for whichever optimizer it drives."""

    cfg: SchedConfig
    total_steps: int

    @property
    def factor(self) -> Callable[[int], float]:
        return lr_factor(self.cfg, self.total_steps)

    def __call__(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)
