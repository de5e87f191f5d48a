"""What a model is made of: `table` (per-layer shapes and parameter counts, via torchinfo) and
`profile` (parameters and forward FLOPs per image, checking the output shape on the way).

Both run one forward of a single image and leave the model, and the global RNG streams, as
they found them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distnn.errors import UserError, reason

PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


@dataclass
class Profile:
    params: int
    trainable: int
    flops: int  # forward FLOPs per image, as FlopCounterMode counts them (2 per multiply-add)

    def describe(self) -> str:
        """One line, e.g. `11.18 M parameters (11.18 M trainable), 1.11 GFLOPs per image`."""
        return (
            f"{_si(self.params)} parameters ({_si(self.trainable)} trainable), "
            f"{_si(self.flops, 'FLOPs')} per image"
        )


def table(model: nn.Module, image_size: int, depth: int = 3) -> str:
    """torchinfo's summary of one 1×3×S×S image: per-layer output shapes, parameter counts and
    the totals."""
    import torchinfo  # only the CLI and tests use it
    from torchinfo.enums import Units

    device = _device(model)
    with _untouched(model, device):
        stats = torchinfo.summary(
            model,
            input_size=(1, 3, image_size, image_size),
            col_names=("output_size", "num_params"),
            depth=depth,
            verbose=0,
            # The model's own device: torchinfo moves the model to the one it is given.
            device=device,
            dtypes=[_dtype(model)],
            mode="eval",
        )
    # torchinfo 1.8.0 labels mult-adds `(Units.MEGABYTES)` on Python 3.11+, where str-mixin
    # enums format as their name (TylerYep/torchinfo#350); it means `(M)`.
    return re.sub(r"\(Units\.(\w+)\)", lambda m: f"({Units[m[1]].value})", str(stats))


def profile(model: nn.Module, image_size: int, num_classes: int, device: torch.device) -> Profile:
    """Parameters and FLOPs of one forward of a zeros image on `device`; raises UserError unless
    the model outputs (1, num_classes)."""
    x = torch.zeros(1, 3, image_size, image_size, dtype=_dtype(model), device=device)
    with _untouched(model, device), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()
        try:
            out = model(x)
        except Exception as e:  # the user's forward can fail any way at all
            raise UserError(
                f"model forward failed on a 1×3×{image_size}×{image_size} batch: {reason(e)}"
            ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"model outputs {got} for one image, expected (1, {num_classes}): "
            "does its classifier take num_classes?"
        )
    params = list(model.parameters())  # shared parameters appear once
    return Profile(
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        flops=int(counter.get_total_flops()),
    )


@contextlib.contextmanager
def _untouched(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    # Every module's own flag, not just the top one: model.train(flag) would also flip
    # submodules deliberately held in eval (frozen BatchNorm).
    modes = [(m, m.training) for m in model.modules()]
    device = torch.device(device)
    # The forward (dropout, torchinfo's random input) must not shift the RNG stream the run's
    # seeding set up.
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for module, training in modes:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _dtype(model: nn.Module) -> torch.dtype:
    floats = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floats, torch.float32)


def _si(n: int, unit: str = "") -> str:
    for scale, prefix in PREFIXES:
        if n >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n} {unit}".rstrip()
