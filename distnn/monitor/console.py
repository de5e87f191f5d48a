"""Console output: a rich progress bar on a terminal, plain periodic lines elsewhere (Slurm)."""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _fmt(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']:.2f}"]
    for key, label, spec in (
        ("loss", "loss", ".4f"),
        ("lr", "lr", ".3g"),
        ("images_per_sec", "img/s", ",.0f"),
        ("val_loss", "val_loss", ".4f"),
        ("val_top1", "val_top1", ".4f"),
        ("val_top5", "val_top5", ".4f"),
        ("val_top1_ema", "val_top1_ema", ".4f"),
    ):
        if key in record:
            parts.append(f"{label} {record[key]:{spec}}")
    return "  ".join(parts)


class BarConsole:
    def __init__(self, total_steps: int, start_step: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, info=""
        )
        self.progress.start()

    def log(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=record["step"], info=_fmt(record))

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def close(self) -> None:
        self.progress.stop()


class LineConsole:
    def __init__(self, total_steps: int, start_step: int) -> None:
        self.total, self.start_step = total_steps, start_step
        self.t0 = time.perf_counter()

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        done = step - self.start_step
        eta = ""
        if done > 0:
            left = (time.perf_counter() - self.t0) / done * (self.total - step)
            eta = f"  eta {datetime.timedelta(seconds=round(left))}"
        print(f"step {step}/{self.total}  {_fmt(record)}{eta}", flush=True)

    def message(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


class NullConsole(LineConsole):
    def log(self, record: dict[str, Any]) -> None:
        pass


def build(mode: str, total_steps: int, start_step: int) -> LineConsole | BarConsole:
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() else "lines"
    kinds = {"bar": BarConsole, "lines": LineConsole, "off": NullConsole}
    return kinds[mode](total_steps, start_step)
