"""An exponential moving average of the weights, kept in fp32 by every rank for the part of the
weights it holds: whole tensors (single, DDP, ZeRO-1/2), its FSDP shards or its ZeRO-3
partitions. The strategy names those tensors (`Strategy.weights`), so one EMA serves them all,
and evaluating the EMA is swapping it into them: a sharded forward then gathers EMA shards.

The averaging is timm's ModelEmaV3 (decay warmup, foreach lerp, fp32 over low-precision
weights, integer buffers copied), over a module whose parameters are those tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from distnn.config import TrainConfig

# A strategy's weights by name: this rank's part, as live views (updated by the optimizer).
Weights = Callable[[], dict[str, torch.Tensor]]


def _module(weights: dict[str, torch.Tensor]) -> nn.ParameterList:
    """The tensors as one module's parameters, sharing their storage."""
    return nn.ParameterList(nn.Parameter(t.detach(), requires_grad=False) for t in weights.values())


class EMA:
    def __init__(
        self,
        weights: Weights,
        decay: float,
        warmup: bool,
        every: int,
        written: Callable[[], None] | None = None,
    ) -> None:
        from timm.utils import ModelEmaV3

        # `written`: what the strategy must do once its weights were written in place (ZeRO-3
        # gathers the parameters it keeps whole again from their partitions).
        self.weights, self.every, self.written = weights, every, written
        live = weights()
        self.names = list(live)
        self.timm = ModelEmaV3(_module(live), decay=decay, use_warmup=warmup, dtype=torch.float32)

    def _shadows(self) -> list[torch.Tensor]:
        return [p.data for p in self.timm.module]

    def update(self, step: int) -> None:
        """After optimizer step `step` (counted from 1): every train.ema_every steps."""
        if step % self.every == 0:
            # The strategy's tensors are looked up each time: ZeRO-3 may re-point them.
            self.timm.update(_module(self.weights()), step=step // self.every)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average over from the weights as they are (a resumed run's checkpoint
        that held no EMA)."""
        for shadow, live in zip(self._shadows(), self.weights().values(), strict=True):
            shadow.copy_(live)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """The EMA in the model's place (evaluation), the weights back after."""
        live = list(self.weights().values())
        kept = [t.clone() for t in live]
        try:
            self._write(live, self._shadows())
            yield
        finally:
            self._write(live, kept)

    def _write(self, targets: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for t, v in zip(targets, values, strict=True):
            t.copy_(v)
        if self.written is not None:
            self.written()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's averages by weight name (its shards or partitions where sharded)."""
        return dict(zip(self.names, self._shadows(), strict=True))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA weights missing: {', '.join(missing[:3])}")
        for name, shadow in self.state_dict().items():
            shadow.copy_(state[name])


def restore(ema: EMA | None, state: dict[str, torch.Tensor] | None) -> None:
    """The checkpoint's EMA, or, where it holds none (its run had none), one that starts over
    from the resumed weights (resume.resume_notes says so)."""
    if ema is None:
        return
    if state is None:
        ema.reset()
    else:
        ema.load_state_dict(state)


@dataclass(frozen=True)
class Averaging:
    """The EMA a strategy keeps over its weights once it has set them up (None: off)."""

    cfg: TrainConfig

    def __call__(self, weights: Weights, written: Callable[[], None] | None = None) -> EMA | None:
        t = self.cfg
        if not t.ema_decay:
            return None
        return EMA(weights, t.ema_decay, t.ema_warmup, t.ema_every, written)
