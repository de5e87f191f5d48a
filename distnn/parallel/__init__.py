"""Processes, devices and strategies: `build` picks the Strategy for the configured name."""

from __future__ import annotations

from collections.abc import Callable

import torch

from distnn.config import Config
from distnn.errors import UserError
from distnn.parallel.ddp import DDP
from distnn.parallel.deepspeed import DeepSpeed
from distnn.parallel.env import Env, detect
from distnn.parallel.fsdp import FSDP
from distnn.parallel.single import SingleProcess
from distnn.parallel.strategy import Strategy
from distnn.precision import Precision

_REGISTRY: dict[str, Callable[[Config, Env, torch.device, Precision], Strategy]] = {
    "single": lambda cfg, env, device, precision: SingleProcess(precision),
    "ddp": lambda cfg, env, device, precision: DDP(precision, cfg.strategy.ddp, device),
    "deepspeed": lambda cfg, env, device, precision: DeepSpeed(cfg, env, precision, device),
    "fsdp": lambda cfg, env, device, precision: FSDP(
        precision, cfg.strategy.fsdp, device, cfg.log.tensorboard_graph, cfg.model.channels_last
    ),
}


def resolve_name(name: str, env: Env) -> str:
    if name == "auto":
        return "ddp" if env.distributed else "single"
    return name


def build(cfg: Config, env: Env, device: torch.device, precision: Precision) -> Strategy:
    name = resolve_name(cfg.strategy.name, env)
    if name not in _REGISTRY:
        raise UserError(f"strategy {name!r} is not available; valid: {', '.join(_REGISTRY)}")
    if name == "single" and env.distributed:
        raise UserError(
            f"strategy.name=single cannot run on {env.world_size} processes; use auto or ddp"
        )
    return _REGISTRY[name](cfg, env, device, precision)


__all__ = ["Env", "Strategy", "build", "detect", "resolve_name"]
