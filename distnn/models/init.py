"""Weight-initialisation schemes (`model.init`): `initialize(model, scheme)`.

Every scheme but "default" re-initialises the weight of each conv (transposed too) and linear
layer, zeroes their biases, and sets affine norm layers to weight 1, bias 0. Parameters held
outside those layers (attention in_proj weights, ViT position embeddings, ...) keep the model's
own init. Draws come from torch's global RNG only: seeding it alike on every rank gives every
rank the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from distnn.errors import UserError

KEY = "model.init"

WEIGHTED: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)  # fmt: skip
NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip

TRUNC_STD = 0.02
TRUNC_SIGMAS = 2.0  # timm/ViT cut the normal at ±2 std


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    # torch's own convention (nn.init._calculate_fan_in_and_fan_out), transposed convs included.
    return weight[0].numel(), weight.shape[0] * weight[0][0].numel()


def _truncated_std(std: float, sigmas: float) -> float:
    # Cutting N(0, std) at ±sigmas·std leaves variance std²·(1 - 2aφ(a) / (2Φ(a) - 1)), a=sigmas:
    # 0.02 cut at ±2 std has std ≈ 0.0176, not 0.02.
    pdf = math.exp(-(sigmas**2) / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(sigmas / math.sqrt(2))
    return std * math.sqrt(1 - 2 * sigmas * pdf / mass)


def _trunc_normal(weight: torch.Tensor) -> None:
    bound = TRUNC_SIGMAS * TRUNC_STD
    nn.init.trunc_normal_(weight, std=TRUNC_STD, a=-bound, b=bound)


WEIGHT_INITS: dict[str, Callable[[torch.Tensor], object]] = {
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
    "xavier_uniform": nn.init.xavier_uniform_,
    "trunc_normal": _trunc_normal,
}

# The std each scheme's draws have, from (fan_in, fan_out).
STDS: dict[str, Callable[[int, int], float]] = {
    "kaiming_normal": lambda fan_in, fan_out: math.sqrt(2 / fan_in),
    # U(-b, b) with b = sqrt(6 / (fan_in + fan_out)) has std b / sqrt(3).
    "xavier_uniform": lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out)),
    "trunc_normal": lambda fan_in, fan_out: _truncated_std(TRUNC_STD, TRUNC_SIGMAS),
}


def _scheme(init_weight: Callable[[torch.Tensor], object]) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        for module in model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, WEIGHTED):
                init_weight(weight)
            elif isinstance(module, NORMS) and weight is not None:  # None: affine=False
                nn.init.ones_(weight)
            else:
                continue
            if bias is not None:
                nn.init.zeros_(bias)

    return apply


def _default(model: nn.Module) -> None:
    """The model's own init, as its constructor left it."""


SCHEMES: dict[str, Callable[[nn.Module], None]] = {
    "default": _default,
    **{name: _scheme(fn) for name, fn in WEIGHT_INITS.items()},
}


def initialize(model: nn.Module, scheme: str) -> None:
    """Re-initialise `model` in place with `scheme` (one of SCHEMES)."""
    _lookup(SCHEMES, scheme)(model)


def expected_std(scheme: str, weight: torch.Tensor) -> float:
    """The std `scheme` gives a conv or linear `weight` (no formula for "default")."""
    return _lookup(STDS, scheme)(*_fans(weight))


def _lookup(registry: dict[str, Callable], scheme: str) -> Callable:
    if scheme not in registry:
        raise UserError(f"unknown {KEY} {scheme!r}; valid: {', '.join(sorted(registry))}")
    return registry[scheme]
