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


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decaying norm scales and biases hurts accuracy and buys no regularisation: every 0-d or
    # 1-d parameter (BN/LN weights, biases) goes in a no-decay group. Both groups exist even
    # when empty, so a checkpoint's optimizer state always has the groups it was saved with.
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {
            "params": [p for p in trainable if (p.ndim <= 1) == no_decay],
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": 1.0,
        }
        for no_decay in (False, True)
    ]


def _layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise LR decay groups (layer ids from the model's group_matcher, the
    no-decay split by the same ≤1-d rule), each with its `lr_scale`, top layer first."""
    if not 0 < layer_decay <= 1:
        raise UserError(f"optim.layer_decay must be in (0, 1] (1: off), got {layer_decay}")
    if not hasattr(model, "group_matcher"):
        raise UserError(
            f"optim.layer_decay needs timm's layer ids, from a model's group_matcher, and "
            f"{type(model).__name__} has none: use a timm model (model.name=timm:<name>) or "
            "set optim.layer_decay=1"
        )
    from timm.optim import param_groups_layer_decay  # timm takes seconds to import

    groups = param_groups_layer_decay(model, weight_decay, layer_decay=layer_decay)
    # Runs log group 0's LR: top layer first, that is the peak LR (the head's layer in timm's
    # ids) the schedule follows.
    return sorted(groups, key=lambda g: -g["lr_scale"])


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    head: str = "",
    head_lr_scale: float = 1.0,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Trainable parameters by weight decay and LR: layer-wise decayed where layer_decay < 1,
    the head's × head_lr_scale on top. Frozen ones (requires_grad False) are left out. Each
    group's "lr" is its own peak LR: the schedule multiplies every group's initial one."""
    split_head = head_lr_scale != 1.0
    if split_head and not head:
        raise UserError(
            "optim.head_lr_scale needs the classifier head and none was found "
            "(no final layer with num_classes outputs): name it with model.head"
        )
    layered = layer_decay != 1.0
    base = (
        _layer_decay_groups(model, weight_decay, layer_decay)
        if layered
        else _decay_groups(model, weight_decay)
    )
    in_head = {
        id(p)
        for name, p in model.named_parameters()
        if split_head and (name == head or name.startswith(head + "."))
    }
    groups = [
        {
            "params": [p for p in g["params"] if (id(p) in in_head) == head_part],
            "weight_decay": g["weight_decay"],
            "lr": lr * g["lr_scale"] * (head_lr_scale if head_part else 1.0),
        }
        for head_part in ((False, True) if split_head else (False,))
        for g in base
    ]
    # timm's groups are the model's non-empty ones; distnn's own pair stays fixed (see above).
    return [g for g in groups if g["params"]] if layered else groups


def _lamb(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import Lamb

    # No clipping inside LAMB (timm's default clips at 1.0): train.clip_grad_norm already clips
    # the global norm over all ranks, where LAMB would measure only the gradients it holds (a
    # shard, under sharded strategies) at a threshold no key shows.
    return Lamb(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, max_grad_norm=None)


def _lars(groups: list[dict], c: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import Lars

    return Lars(
        groups,
        lr=c.lr,
        momentum=c.momentum,
        nesterov=c.nesterov and c.momentum > 0,
        trust_coeff=c.trust_coeff,
    )


_OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda groups, c: torch.optim.SGD(
        groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0
    ),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps),
    "lamb": _lamb,
    "lars": _lars,
}

# timm's LAMB and LARS adapt the LR of weight-decayed parameters only (so norms and biases,
# in the no-decay group, step unadapted): without weight decay they are these.
_UNADAPTED_WITHOUT_DECAY = {"lamb": "Adam", "lars": "SGD with momentum"}


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
        c = self.cfg
        if c.name in _UNADAPTED_WITHOUT_DECAY and c.weight_decay == 0:
            raise UserError(
                f"optim.name={c.name} adapts the LR of weight-decayed parameters only (timm's "
                f"rule, which keeps norms and biases out): with optim.weight_decay=0 it is "
                f"{_UNADAPTED_WITHOUT_DECAY[c.name]}; set optim.weight_decay above 0"
            )
        return param_groups(
            model, c.weight_decay, self.lr, self.head, c.head_lr_scale, c.layer_decay
        )

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
