"""The training loop. It talks to a Strategy and never asks which one it has."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distnn import checkpoint, faults
from distnn import config as config_lib
from distnn.config import Config
from distnn.data import Loaders
from distnn.data.prefetch import DevicePrefetcher
from distnn.monitor import Run
from distnn.monitor.throughput import Throughput
from distnn.parallel import dist
from distnn.parallel.strategy import Strategy
from distnn.precision import Precision


@dataclass
class Position:
    """Where the run is: enough, with the deterministic sample order, to resume exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch
    batch: int = 0  # micro-batches of `epoch` already consumed

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]


def total_steps(cfg: Config, loaders: Loaders) -> int:
    per_epoch = loaders.steps_per_epoch // cfg.train.accum_steps
    return cfg.train.max_steps or cfg.train.epochs * per_epoch


@dataclass
class Engine:
    cfg: Config
    strategy: Strategy
    model: nn.Module  # what forward is called on (wrapped by the strategy, maybe compiled)
    loaders: Loaders
    precision: Precision
    device: torch.device
    run: Run
    ckpt: checkpoint.Manager
    pos: Position = dataclasses.field(default_factory=Position)

    def __post_init__(self) -> None:
        t = self.cfg.train
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.total = total_steps(self.cfg, self.loaders)
        self.steps_per_epoch = self.loaders.steps_per_epoch // t.accum_steps
        self.meter = Throughput(dist.world_size())
        self.last_val: dict[str, float] = {}
        self.last_train_loss = math.nan
        self.images_per_sec = math.nan
        self.fault = faults.from_env()
        self.rank = dist.rank()

    def _batches(self, loader: Any) -> DevicePrefetcher:
        return DevicePrefetcher(
            loader,
            self.device,
            self.loaders.mean,
            self.loaders.std,
            self.cfg.model.channels_last,
        )

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.state_dict(),
            "position": self.pos.state_dict(),
            "config": config_lib.to_dict(self.cfg),
            "classes": self.loaders.classes,
            "mean": self.loaders.mean,
            "std": self.loaders.std,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.pos.load_state_dict(state["position"])
        checkpoint.restore_rng(state, dist.rank())

    def save(self) -> None:
        if self.ckpt.last_saved_step != self.pos.step:
            self.ckpt.save(self.state_dict(), self.pos.step)

    # --- the loop -------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        epochs = math.ceil(self.total / self.steps_per_epoch)
        start = time.perf_counter()
        while self.pos.step < self.total and self.pos.epoch < epochs:
            self.train_epoch()
            last = self.pos.step >= self.total
            if last or self.pos.epoch % t.eval_every == 0:
                self.last_val = self.evaluate()
                self.run.log({"step": self.pos.step, "epoch": self.pos.epoch, **self.last_val})
            if self.cfg.ckpt.epoch_end:
                self.save()
        self.save()
        return {
            "train_loss": self.last_train_loss,
            **self.last_val,
            "images_per_sec": self.images_per_sec,
            "steps": self.pos.step,
            "epochs": self.pos.epoch,
            "world_size": dist.world_size(),
            "wall_s": time.perf_counter() - start,
        }

    def train_epoch(self) -> None:
        t = self.cfg.train
        accum = t.accum_steps
        self.model.train()
        self.loaders.train_order.set_epoch(self.pos.epoch, self.pos.batch)
        loss_sum = torch.zeros((), device=self.device)
        micro_count = 0
        images = t.batch_size * accum
        self.meter.reset()
        batches = iter(self._batches(self.loaders.train))
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            self.meter.add_wait(time.perf_counter() - waited)
            if batch is None:
                break
            x, y = batch
            self.pos.batch += 1
            final = self.pos.batch % accum == 0
            # Non-final micro-batches only accumulate locally: no gradient all-reduce.
            with contextlib.nullcontext() if final else self.strategy.no_sync():
                with self.precision.autocast():
                    loss = self.criterion(self.model(x), y)
                self.strategy.backward(loss / accum)
            loss_sum += loss.detach()
            micro_count += 1
            if not final:
                continue
            log_now = (self.pos.step + 1) % t.log_every == 0 or self.pos.step + 1 == self.total
            grad_norm = None
            if t.clip_grad_norm > 0 or log_now:
                grad_norm = self.strategy.clip_grad_norm(t.clip_grad_norm)
            self.strategy.step()
            self.pos.step += 1
            self.meter.add(images)
            if self.fault is not None:
                self.fault.check(self.pos.step, self.rank)
            if log_now:
                self._log_train(loss_sum, micro_count, grad_norm)
                loss_sum.zero_()
                micro_count = 0
            if self.cfg.ckpt.every_steps and self.pos.step % self.cfg.ckpt.every_steps == 0:
                self.save()
            if self.pos.step >= self.total:
                break
        self.pos.epoch += 1
        self.pos.batch = 0

    def _log_train(
        self, loss_sum: torch.Tensor, micro_count: int, grad_norm: torch.Tensor | None
    ) -> None:
        # The one host sync of a log interval: the loss summed over ranks.
        count = torch.tensor(float(micro_count), device=self.device)
        totals = dist.all_reduce_sum(torch.stack([loss_sum, count]))
        loss = (totals[0] / totals[1]).item()
        self.last_train_loss = loss
        rates = self.meter.read()
        self.images_per_sec = rates["images_per_sec"]
        record = {
            "step": self.pos.step,
            "epoch": round(self.pos.epoch + self.pos.batch / self.loaders.steps_per_epoch, 4),
            "loss": loss,
            "lr": self.strategy.lr(),
            **rates,
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.run.log(record)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole eval set: each rank scores its share (sample i
        on rank i mod world) and the sums are all-reduced, so every sample counts once."""
        model = self.strategy.unwrap()
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, n
        for x, y in self._batches(self.loaders.val):
            with self.precision.autocast():
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            sums[0] += loss.double()
            sums[1] += hit[:, :1].sum()
            sums[2] += hit.sum()
            sums[3] += len(y)
        loss, top1, top5, n = dist.all_reduce_sum(sums).tolist()
        return {"val_loss": loss / n, "val_top1": top1 / n, "val_top5": top5 / n}
