"""The training loop. It talks to a Strategy and never asks which one it has."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distnn import __version__, checkpoint, faults, preempt
from distnn import config as config_lib
from distnn.config import Config
from distnn.data import Loaders
from distnn.data.prefetch import DevicePrefetcher
from distnn.errors import UserError
from distnn.mixing import Mixer
from distnn.monitor import Run, ranks
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


class Meters:
    """Running sums of the current log interval and the run's counters, saved with checkpoints
    so that a resumed run logs the same numbers. Tensors stay on the device: adding to them
    needs no host sync."""

    def __init__(self, device: torch.device) -> None:
        self.step_loss = torch.zeros((), device=device)  # skip mode: the step's, until it stands
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count = 0
        self.skipped = 0  # steps dropped by train.nonfinite=skip
        # fp16 steps the GradScaler skipped on overflow: counted on the device, read at logs.
        self.overflows = torch.zeros((), dtype=torch.int64, device=device)
        # The summary's, so that an attempt that trains no further still reports them.
        self.last_train_loss = math.nan
        self.images_per_sec = math.nan

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum.item(),
            "loss_count": self.loss_count,
            "skipped": self.skipped,
            "overflows": int(self.overflows),
            "last_train_loss": self.last_train_loss,
            "images_per_sec": self.images_per_sec,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.fill_(state["loss_sum"])
        self.loss_count, self.skipped = state["loss_count"], state["skipped"]
        self.overflows.fill_(state.get("overflows", 0))
        self.last_train_loss = state.get("last_train_loss", math.nan)
        self.images_per_sec = state.get("images_per_sec", math.nan)


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
    preemption: preempt.Watcher
    # The loss of a batch's logits against its targets (class indices, or probabilities where
    # the batch is mixed), and what mixes batches (MixUp/CutMix) if anything does.
    loss: nn.Module = dataclasses.field(default_factory=nn.CrossEntropyLoss)
    mixer: Mixer | None = None
    pos: Position = dataclasses.field(default_factory=Position)

    def __post_init__(self) -> None:
        t = self.cfg.train
        self.total = total_steps(self.cfg, self.loaders)
        self.steps_per_epoch = self.loaders.steps_per_epoch // t.accum_steps
        # Memory on every read; on CUDA also TFLOP/s and MFU (FLOPs counted once, here).
        self.meter = Throughput.for_model(
            self.strategy.unwrap(), self.cfg.data.image_size, self.device
        )
        self.last_val: dict[str, float] = {}
        self.start = time.perf_counter()
        self.fault = faults.from_env()
        self.rank = dist.rank()
        self.ranks = ranks.Ranks(self.cfg.monitor, self.device, self.fault)
        self.phases = self.ranks.phases
        self.strategy.on_comm(lambda: self.phases.enter("comm", self.pos.step + 1))
        self.skip_nonfinite = t.nonfinite == "skip"
        self.meters = Meters(self.device)

    def _batches(self, loader: Any) -> DevicePrefetcher:
        return DevicePrefetcher(
            loader,
            self.device,
            self.loaders.mean,
            self.loaders.std,
            self.cfg.model.channels_last,
        )

    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's eval batches; where a forward is a collective (sharded parameters),
        empty batches after its own run out, until every rank's have (one small all-reduce
        per batch: evaluation only)."""
        batches = iter(self._batches(self.loaders.val))
        if not self.strategy.lockstep_forward:
            yield from batches
            return
        size = self.cfg.data.image_size
        empty = (torch.zeros(0, 3, size, size, device=self.device),
                 torch.zeros(0, dtype=torch.int64, device=self.device))  # fmt: skip
        while True:
            batch = next(batches, None)
            if not dist.any_true(batch is not None, self.device):
                return
            yield empty if batch is None else batch

    # --- checkpoints ----------------------------------------------------------------------

    def stateful(self) -> dict[str, Any]:
        """The pieces a checkpoint holds, each saving and loading its own state (torchtitan's
        and Fabric's Stateful): the strategy's model and optimizer, the loop position, the
        meters and every rank's random generators (restored last)."""
        return {"strategy": self.strategy, "position": self.pos, "meters": self.meters,
                "rng": checkpoint.RankRNG()}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            **{name: piece.state_dict() for name, piece in self.stateful().items()},
            "config": config_lib.to_dict(self.cfg),
            "classes": self.loaders.classes,
            "mean": self.loaders.mean,
            "std": self.loaders.std,
            "world_size": dist.world_size(),
            "distnn_version": __version__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, piece in self.stateful().items():
            try:
                piece.load_state_dict(state[name])
            except (RuntimeError, KeyError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(
                    f"checkpoint {str(self.ckpt.restored_from)!r} does not fit this run "
                    f"({name}): {first}"
                ) from None

    def save(self, best: bool = False) -> None:
        if self.ckpt.last_saved_step == self.pos.step and not best:
            return
        self.phases.enter("stall", self.pos.step)
        if not torch.isfinite(self.meters.loss_sum).item():  # never checkpoint a diverged model
            raise UserError(
                f"non-finite training loss before step {self.pos.step}; not checkpointing it"
            )
        self.ckpt.save(self.state_dict(), self.pos.step, best, self.strategy.save_shards)

    # --- the loop -------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        epochs = math.ceil(self.total / self.steps_per_epoch)
        self.start = time.perf_counter()
        while self.pos.step < self.total and self.pos.epoch < epochs:
            finished = self.train_epoch()
            last = self.pos.step >= self.total
            best = False
            if last or (finished and self.pos.epoch % t.eval_every == 0):
                best = self.validate()
            if (self.cfg.ckpt.epoch_end and finished) or best:
                self.save(best=best)
        if not self.last_val and self.validate():  # resumed at the last step, before its eval
            self.save(best=True)
        self.save()
        return {
            "train_loss": self.meters.last_train_loss,
            **self.last_val,
            "images_per_sec": self.meters.images_per_sec,
            "steps": self.pos.step,
            "epochs": self.epochs_done(),
            "world_size": dist.world_size(),
            "wall_s": time.perf_counter() - self.start,
        }

    def epochs_done(self) -> float:
        """Epochs trained, a fraction where a run stopped (max_steps) mid-epoch."""
        return round(self.pos.epoch + self.pos.batch / self.loaders.steps_per_epoch, 4)

    def train_epoch(self) -> bool:
        """Train until the epoch's batches or the run's steps run out; whether the epoch
        finished. A run stopped mid-epoch keeps its place, so that extending it (a larger
        train.max_steps) continues the same epoch from the next batch."""
        self.model.train()
        self.loaders.train_order.set_epoch(self.pos.epoch, self.pos.batch)
        self.meter.reset()
        batches = iter(self._batches(self.loaders.train))
        exhausted = False
        while self.pos.step < self.total:
            batch = self.next_batch(batches)
            if batch is None:
                exhausted = True
                break
            if self.run.wants_images:  # once per run: a grid of the first batch
                loaders = self.loaders
                self.run.log_first_batch(
                    batch[0], self.strategy.unwrap(), self.pos.step, loaders.mean, loaders.std
                )
            self.pos.batch += 1
            final = self.pos.batch % self.cfg.train.accum_steps == 0
            self.forward_backward(*batch, final=final)
            if final:
                self.phases.enter("optimizer", self.pos.step + 1)
                self.optimizer_step()
        if not exhausted and self.pos.batch < self.loaders.steps_per_epoch:
            return False
        self.pos.epoch += 1
        self.pos.batch = 0
        return True

    def next_batch(self, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor] | None:
        self.phases.enter("data", self.pos.step + 1)
        return next(batches, None)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, final: bool) -> None:
        self.phases.enter("compute", self.pos.step + 1)
        accum = self.cfg.train.accum_steps
        # Non-final micro-batches only accumulate locally: no gradient all-reduce.
        if self.mixer is not None:
            x, y = self.mixer(x, y, self.pos.step, self.pos.batch)
        with contextlib.nullcontext() if final else self.strategy.no_sync():
            with self.precision.autocast():
                loss = self.loss(self.model(x), y)
            if self.fault is not None:
                loss = self.fault.corrupt(loss, self.pos.step + 1, self.rank)
            self.strategy.backward(loss / accum if accum > 1 else loss)
        # skip mode keeps the step's loss apart until it knows the step stands
        (self.meters.step_loss if self.skip_nonfinite else self.meters.loss_sum).add_(loss.detach())

    def optimizer_step(self) -> None:
        t = self.cfg.train
        log_now = (self.pos.step + 1) % t.log_every == 0 or self.pos.step + 1 == self.total
        grad_norm = None
        if t.clip_grad_norm > 0 or log_now or self.skip_nonfinite:
            grad_norm = self.strategy.clip_grad_norm(t.clip_grad_norm)
        # skip mode reads the norm on the host every step (like fp16's GradScaler): a NaN or
        # inf loss always makes the norm non-finite, so the norm alone tells.
        if self.skip_nonfinite and not torch.isfinite(grad_norm).item():
            self.skip_step()
            return
        # An fp16 overflow skip still counts as a step (and steps the schedule): telling it
        # apart on the host would sync every step.
        stepped = self.strategy.step()
        if stepped is not None:
            self.meters.overflows += ~stepped
        if self.skip_nonfinite:
            self.meters.loss_sum += self.meters.step_loss
            self.meters.step_loss.zero_()
        self.meters.loss_count += t.accum_steps
        self.pos.step += 1
        if self.strategy.ema is not None:
            self.strategy.ema.update(self.pos.step)
        self.meter.add(t.batch_size * t.accum_steps)
        if self.fault is not None:
            self.fault.check(self.pos.step, self.rank)
        if log_now:
            self._log_train(self.meters.loss_sum, self.meters.loss_count, grad_norm)
            self.meters.loss_sum.zero_()
            self.meters.loss_count = 0
            if not math.isfinite(self.meters.last_train_loss):
                raise UserError(
                    f"non-finite training loss by step {self.pos.step} "
                    "(train.nonfinite=raise); lower optim.lr, clip gradients "
                    "(train.clip_grad_norm) or set train.nonfinite=skip"
                )
        if self.cfg.ckpt.every_steps and self.pos.step % self.cfg.ckpt.every_steps == 0:
            self.save()
        if self.preemption.poll():
            self.save()
            raise preempt.Preempted()

    def skip_step(self) -> None:
        self.strategy.discard()
        self.meters.step_loss.zero_()
        self.meters.skipped += 1
        self.run.message(f"skipped step {self.pos.step + 1}: non-finite gradient norm")
        if self.meters.skipped > self.cfg.train.max_skips:
            raise UserError(
                f"non-finite gradients at step {self.pos.step + 1}: {self.meters.skipped} steps "
                f"skipped, more than train.max_skips={self.cfg.train.max_skips}"
            )

    def _log_train(
        self, loss_sum: torch.Tensor, micro_count: int, grad_norm: torch.Tensor | None
    ) -> None:
        # The one host sync of a log interval: every rank's loss sum, images and phase times.
        loss, rates, stragglers = self.ranks.interval(loss_sum, micro_count, self.meter.read())
        self.meters.last_train_loss = loss
        self.meters.images_per_sec = rates["images_per_sec"]
        record = {
            "step": self.pos.step,
            "epoch": self.epochs_done(),
            "loss": loss,
            "lr": self.strategy.lr(),
            "elapsed_s": time.perf_counter() - self.start,  # since this attempt's fit() began
            # images/s, step time, data wait, memory; on CUDA TFLOP/s and MFU; each phase's
            # seconds per step over the ranks (max, median, min) and the slowest rank
            **rates,
            # non-finite steps dropped, plus fp16 steps the loss scaler skipped
            "skipped_steps": self.meters.skipped + int(self.meters.overflows),
            "data_errors": self.loaders.errors.skipped,  # unreadable samples, this rank
            **self.loaders.cache_counts(),  # remote shards: this node's downloads and hits
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.run.log(record)
        for line in stragglers:
            self.run.message(line)

    def validate(self) -> bool:
        """Evaluate, log the record; whether it is the best so far (checkpoints/best)."""
        self.phases.enter("stall", self.pos.step)
        self.last_val = self.evaluate()
        if self.strategy.ema is not None:
            with self.strategy.ema.swapped():
                self.last_val |= {f"{k}_ema": v for k, v in self.evaluate().items()}
        elapsed = time.perf_counter() - self.start
        self.run.log(
            {"step": self.pos.step, "epoch": self.epochs_done(), "elapsed_s": elapsed}
            | self.last_val
        )
        return self.ckpt.improves(self.last_val)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole eval set: each rank scores its own share of the
        samples (data/order.py) and the sums are all-reduced, so every sample counts once."""
        model = self.strategy.unwrap()
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, n
        for x, y in self._eval_batches():
            self.phases.enter("stall", self.pos.step)  # progress, for the watchdog
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
