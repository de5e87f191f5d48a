"""One process owns the whole model: the base that DDP extends with gradient reduction."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distnn.ema import EMA, Averaging, restore
from distnn.optim import Optimizers, Schedule
from distnn.parallel import dcp
from distnn.precision import Precision


class SingleProcess:
    save_shards = None  # every rank holds the whole state: state_dict() has it all
    collective = False
    lockstep_forward = False  # a forward is local: ranks may run different numbers of them
    meta_init = False  # every rank holds the whole model anyway

    def __init__(self, precision: Precision) -> None:
        self.precision = precision
        self.scaler = precision.grad_scaler()
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.ema: EMA | None = None

    def describe(self) -> str:
        return f"single process, precision {self.precision.name}"

    def setup(
        self,
        model: nn.Module,
        optimizers: Optimizers,
        schedule: Schedule,
        average: Averaging | None = None,
    ) -> nn.Module:
        self.model = model
        forward = self.wrap(model)  # may replace self.model's layers (SyncBatchNorm)
        self.optimizer = optimizers(self.model)
        self.scheduler = schedule(self.optimizer)
        self.ema = average(self.weights) if average is not None else None
        return forward

    def weights(self) -> dict[str, torch.Tensor]:
        return self.unwrap().state_dict()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def on_comm(self, mark: Callable[[], None]) -> None:
        pass  # one process waits for no one

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the scaled one
        if max_norm <= 0:  # measure only: no multiply by a clip factor of 1
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            return nn.utils.get_total_norm(grads, foreach=True)
        return nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)

    def step(self) -> torch.Tensor | None:
        stepped = None
        if self.scaler is None:
            self.optimizer.step()
        else:
            # The scale only shrinks when an overflow made the scaler skip the step; comparing
            # the tensors tells which without a host sync.
            before = self.scaler._scale.clone()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler._scale >= before
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def discard(self) -> None:
        if self.scaler is not None:
            # clip_grad_norm unscaled these gradients and found the inf: update() shrinks the
            # scale and resets the scaler, as its own skipped step would.
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def close(self) -> None:
        self.model = self.optimizer = self.scheduler = self.ema = None

    def unwrap(self) -> nn.Module:
        return self.model

    def load_full(self, state: dict[str, Any]) -> None:
        """The model and optimizer from a checkpoint file that holds them whole."""
        self.unwrap().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.unwrap().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") == dcp.FORMAT:  # an FSDP run's shards, resharded for this one
            dcp.load(self.model, self.optimizer, state["shards"], self.ema)
        else:
            self.load_full(state)
            restore(self.ema, state.get("ema"))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
