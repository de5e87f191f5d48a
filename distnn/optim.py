"""Optimizers and LR schedules, counted in optimizer steps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

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


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, global_batch: int, head: str = ""
) -> torch.optim.Optimizer:
    cfg = dataclasses.replace(cfg, lr=peak_lr(cfg, global_batch))
    head_lr = cfg.lr * cfg.head_lr_scale if cfg.head_lr_scale != 1.0 else None
    groups = param_groups(model, cfg.weight_decay, head, head_lr)
    return _OPTIMIZERS[cfg.name](groups, cfg)


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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
