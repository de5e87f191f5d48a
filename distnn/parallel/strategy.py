"""The interface between the training loop and how work is spread over processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distnn.ema import EMA, Averaging
from distnn.optim import Optimizers, Schedule


class Strategy(Protocol):
    """What engine.py calls; it never asks which strategy it holds."""

    # Where a strategy's state is split across ranks (ZeRO), a collective that writes every
    # rank's part into a checkpoint directory; None where state_dict() holds everything.
    save_shards: Callable[[Path], None] | None
    # Whether the strategy runs collectives (DDP, DeepSpeed): a lone process then still gets a
    # process group, of one.
    collective: bool
    # Whether a forward is itself a collective (sharded parameters are gathered in it): then
    # every rank must run as many as the others, evaluation included.
    lockstep_forward: bool
    # Whether setup() takes a model built on the meta device (models/deferred.py) and fills its
    # shards itself: then no rank needs the whole model in memory.
    meta_init: bool
    # The EMA of the weights setup() made where the run keeps one (train.ema_decay), over
    # weights(); saved and loaded with the strategy's own state.
    ema: EMA | None

    def describe(self) -> str:
        """One line for the run log: the strategy and its main settings."""

    def setup(
        self,
        model: nn.Module,
        optimizers: Optimizers,
        schedule: Schedule,
        average: Averaging | None = None,
    ) -> nn.Module:
        """Wrap (or shard) the model, then build the optimizer over the parameters that
        exposes, the schedule over the optimizer and the EMA over weights(); return the module
        to call forward on."""

    def weights(self) -> dict[str, torch.Tensor]:
        """This rank's part of the model's parameters and buffers by name, as plain tensors
        that share the strategy's storage: whole (single, DDP, ZeRO-1/2), the local FSDP
        shards, or the ZeRO-3 partitions."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-batches whose gradients must not be reduced yet."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def on_comm(self, mark: Callable[[], None]) -> None:
        """Have backward call `mark` where this rank's own gradients are done and it starts
        waiting for their communication (DDP: the last bucket is ready). A strategy whose
        communication is woven through forward and backward (FSDP, DeepSpeed) or absent
        never calls it: there the wait counts as compute."""

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm before clipping (max_norm <= 0: measure only), as a tensor."""

    def step(self) -> torch.Tensor | None:
        """Optimizer (and scheduler) step and zero_grad. With a loss scaler, a bool tensor,
        false where an fp16 overflow skipped the step (a tensor: callers sync only when they
        log); None where no step can be skipped."""

    def discard(self) -> None:
        """Drop the accumulated gradients without stepping (a step skipped for non-finite
        gradients); an fp16 loss scale shrinks as after an overflow."""

    def lr(self) -> float:
        """The current learning rate (first parameter group)."""

    def unwrap(self) -> nn.Module:
        """The plain model, as the zoo built it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Let go of the model, optimizer and engine before the process group is destroyed:
        whatever still holds the group's work at interpreter exit may abort the process."""
