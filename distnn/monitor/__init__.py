"""One `Run` fans every record out to the console, metrics.jsonl, TensorBoard and W&B, on
rank 0 only. Every sink gets the same keys at the same step (the optimizer step)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from distnn import config as config_lib
from distnn import fsio
from distnn.config import Config
from distnn.monitor import console, images
from distnn.parallel.env import Env


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; write them as null rather than produce a file others cannot parse.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


class Run:
    """The run directory and everything written to it. Non-zero ranks hold a Run too, so the
    caller never branches on rank; theirs writes nothing."""

    def __init__(self, cfg: Config, env: Env, total_steps: int, start_step: int = 0) -> None:
        self.dir = cfg.run_dir
        self.writes = env.is_main
        self.console = console.build(
            cfg.log.progress if self.writes else "off", total_steps, start_step
        )
        self.metrics = None
        self.sinks: list[Any] = []  # TensorBoard, W&B: log, first_batch, summary, close
        self.wants_images = False  # the engine hands over one training batch when True
        if self.writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            fsio.write_text(self.dir / "config.yaml", config_lib.to_yaml(cfg))
            _rewind(self.dir / "metrics.jsonl", start_step)
            # Line-buffered and open for the whole run: a killed job keeps every record written.
            with fsio.reporting(self.dir / "metrics.jsonl"):
                self.metrics = fsio.open_append(self.dir / "metrics.jsonl")
            try:
                if cfg.log.tensorboard:
                    self._start_tensorboard(cfg, start_step)
                from distnn.monitor.wandb import WandbSink

                sink = WandbSink.start(cfg, start_step, self.message)
                if sink is not None:
                    self.sinks.append(sink)
            except BaseException:
                self.close()
                raise
            self.wants_images = bool(self.sinks) and start_step == 0

    def _start_tensorboard(self, cfg: Config, start_step: int) -> None:
        try:
            from distnn.monitor.tensorboard import TensorBoardSink

            self.sinks.append(TensorBoardSink(cfg, start_step))
        except ImportError as e:  # torch.utils.tensorboard needs the tensorboard package
            self.message(
                f"TensorBoard off ({e}): pip install tensorboard, or log.tensorboard=false"
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        with fsio.reporting(self.dir / "metrics.jsonl"):
            self.metrics.write(json.dumps(_clean(record)) + "\n")
        self.console.log(record)
        self._to_sinks(lambda sink: sink.log(record))

    def _to_sinks(self, call: Callable[[Any], None]) -> None:
        # TensorBoard writes its event files under the run directory (W&B in its own process).
        with fsio.reporting(self.dir):
            for sink in self.sinks:
                call(sink)

    def log_first_batch(
        self,
        x: torch.Tensor,
        model: torch.nn.Module,
        step: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        """Once per run (the first call): a grid of a normalised training batch for every
        sink, and the model graph for TensorBoard when asked for."""
        if not self.wants_images:
            return
        self.wants_images = False
        grid = images.grid(x, mean, std)
        self._to_sinks(lambda sink: sink.first_batch(grid, x, model, step))

    def message(self, text: str) -> None:
        if self.writes:
            self.console.message(text)

    def summary(self, values: dict[str, Any]) -> None:
        if self.writes:
            fsio.write_text(self.dir / "summary.json", json.dumps(_clean(values), indent=2) + "\n")
            self._to_sinks(lambda sink: sink.summary(values))

    def close(self) -> None:
        self.console.close()
        if self.metrics is not None:
            # Line-buffered: all it can hold is what a failed log() could not write, and
            # that log() has said why.
            with contextlib.suppress(OSError):
                self.metrics.close()
            self.metrics = None
        sinks, self.sinks = self.sinks, []
        # Each sink closes even when one fails (a full disk), which then shows as one line.
        with fsio.reporting(self.dir), contextlib.ExitStack() as closing:
            for sink in reversed(sinks):
                closing.callback(sink.close)


def watch(
    cfg: Config, ranks: Any, run: Run, device: torch.device, stopping: Callable[[], bool]
) -> contextlib.ExitStack:
    """This rank's watchdog (hangs) and profiler window (prof.*), closed together on exit.
    `ranks`: the engine's monitor.ranks.Ranks; `stopping`: whether a signal asked the process
    to stop."""
    from distnn.monitor import profile, watchdog

    stack = contextlib.ExitStack()
    dog = watchdog.start(ranks, cfg.run_dir, cfg.dist.hang_after_s, stopping)
    if dog is not None:
        stack.callback(dog.close)
    if profile.wanted(cfg.prof, ranks.me.rank, device):
        window = profile.Window(cfg.prof, ranks.phases, ranks.me.rank, cfg.run_dir, device,
                                run.message)  # fmt: skip
        stack.callback(window.close)
    return stack


def _rewind(path: Path, step: int) -> None:
    """Drop the records past `step` from a metrics.jsonl, atomically: a resumed run logs those
    steps again, and each step stays in the file once."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    kept = []
    for line in lines:
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill, or blank
        if record_step <= step:
            kept.append(line + "\n")
    fsio.write_text(path, "".join(kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
