"""Where each rank's time goes, gathered from every rank once per log interval.

The engine says which phase it enters, and only that (`Phases.enter`): data (waiting for the
next batch), compute (forward and backward of a micro-batch), comm (backward's own work is
done and the rank waits for the gradient communication: the strategy marks it), optimizer
(the step, with its communication and the log interval's own) and stall (checkpoints and
evaluation). On the CPU a transition costs one `perf_counter()` and an addition; on CUDA it
also records an event on the current stream, and the events are read at log intervals only
(after the interval's one host sync), so the figures are the device's time, never a per-step
sync. Whatever else acts on a transition (an injected slow@/hang@ fault, the profiler's phase
labels) listens to it: the loop has no branch for them.

At each log interval one all-gather brings every rank's row (loss sum, images, seconds per
phase) to every rank: the loss and the throughput of the whole job, each phase's max, median
and min over ranks, the slowest rank, and the straggler lines.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as td

from distnn.config import MonitorConfig
from distnn.faults import Fault
from distnn.parallel.env import detect

PHASES = ("data", "compute", "comm", "optimizer", "stall")
WAITING = ("comm",)  # a rank here waits for the others: not the time that makes a rank slow
# A straggler must also lose this much per step: at sub-millisecond steps the OS scheduler's
# jitter alone passes any ratio, and no job is slowed by a rank that costs it less.
STRAGGLER_FLOOR_S = 0.001
DESCRIBE = {
    "data": "data wait",
    "compute": "forward/backward",
    "comm": "gradient communication",
    "optimizer": "optimizer step",
    "stall": "checkpoint/evaluation",
}
Listener = Callable[[str, int], None]  # (phase, step), as the rank enters the phase


class Phases:
    def __init__(self, device: torch.device | None = None) -> None:
        self.current = "stall"  # set-up, until the loop asks for its first batch
        self.step = 0
        self.moves = 0  # transitions so far: the watchdog's sign of progress
        self.since = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.listeners: list[Listener] = []
        self.events = device is not None and device.type == "cuda"
        self.marks: list[tuple[str, torch.cuda.Event]] = []  # CUDA: this interval's, in order
        if self.events:
            self.marks.append((self.current, self._event()))

    def enter(self, phase: str, step: int) -> None:
        """From now on this rank is in `phase` of optimizer step `step` (counted from 1)."""
        now = time.perf_counter()
        self.seconds[self.current] += now - self.since
        self.current, self.step, self.since = phase, step, now
        self.moves += 1
        if self.events:
            self.marks.append((phase, self._event()))
        for listener in self.listeners:
            listener(phase, step)

    @staticmethod
    def _event() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def read(self) -> dict[str, float]:
        """Seconds in each phase since the last read (the phase now running counts up to
        now); starts the next interval."""
        now = time.perf_counter()
        self.seconds[self.current] += now - self.since
        self.since = now
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        if self.events:  # the device's time between the marks instead of the host's
            out = dict.fromkeys(PHASES, 0.0)
            self.marks.append((self.current, self._event()))
            self.marks[-1][1].synchronize()
            for (phase, start), (_, end) in zip(self.marks, self.marks[1:], strict=False):
                out[phase] += start.elapsed_time(end) / 1000
            self.marks = self.marks[-1:]
        return out


@dataclass(frozen=True)
class Where:
    """Where a rank runs, for the lines that name it."""

    rank: int
    host: str
    local_rank: int
    gpu: str  # the CUDA device index, or "cpu"
    pid: int

    def __str__(self) -> str:
        return f"rank {self.rank} on {self.host} (local rank {self.local_rank}, GPU {self.gpu})"

    @classmethod
    def here(cls, rank: int, local_rank: int, device: torch.device) -> Where:
        gpu = str(device.index) if device.type == "cuda" else "cpu"
        return cls(rank, socket.gethostname(), local_rank, gpu, os.getpid())


def where_all(here: Where) -> list[Where]:
    """Every rank's Where, in rank order (one all_gather_object, once per run)."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [here]
    out: list[Where | None] = [None] * td.get_world_size()
    td.all_gather_object(out, here)
    return out  # type: ignore[return-value]


# torch 2.14 renamed all_gather_into_tensor; the lent GPU machine's torch predates that.
_all_gather = getattr(td, "all_gather_single", None) or td.all_gather_into_tensor

# A rank's row: what it adds to the job's figures and where its time went, per interval.
COLUMNS = ("loss_sum", "loss_count", "images", "steps", "seconds", *PHASES)


def gather(loss_sum: torch.Tensor, figures: dict[str, float]) -> list[list[float]]:
    """Every rank's row (COLUMNS), one per rank: one all-gather of len(COLUMNS) numbers per
    rank, and the interval's one host sync."""
    mine = [figures[c] for c in COLUMNS[1:]]
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [[loss_sum.item(), *mine]]  # alone: no tensor to build (~50 µs an interval)
    row = torch.tensor([0.0, *mine], dtype=torch.float64).to(loss_sum.device, non_blocking=True)
    row[0] = loss_sum.detach()  # stays on the device until the gather
    rows = row.new_empty(td.get_world_size() * len(COLUMNS))
    _all_gather(rows, row)
    flat = rows.tolist()
    return [flat[i : i + len(COLUMNS)] for i in range(0, len(flat), len(COLUMNS))]


@dataclass
class Interval:
    """One log interval's figures over all ranks."""

    loss: float
    record: dict[str, float]  # for metrics.jsonl and the trackers
    per_step: list[dict[str, float]]  # each rank's seconds per step in each phase
    busy: list[float]  # each rank's seconds per step outside the waiting phases


def summarize(rows: list[list[float]]) -> Interval:
    cols = dict(zip(COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
    count = sum(cols["loss_count"])
    loss = sum(cols["loss_sum"]) / count if count else float("nan")
    steps = [max(s, 1.0) for s in cols["steps"]]
    per_step = [
        {p: cols[p][r] / steps[r] for p in PHASES} for r in range(len(steps))
    ]  # fmt: skip
    busy = [sum(v for p, v in row.items() if p not in WAITING) for row in per_step]
    seconds = [max(s, 1e-9) for s in cols["seconds"]]
    rates = [i / s for i, s in zip(cols["images"], seconds, strict=True)]
    record: dict[str, float] = {
        "images_per_sec": sum(rates),  # each rank's own rate, summed
        "images_per_sec_per_device": sum(rates) / len(rates),
        "data_wait": max(d / s for d, s in zip(cols["data"], seconds, strict=True)),
        "slowest_rank": max(range(len(busy)), key=busy.__getitem__),
    }
    for p in PHASES:
        values = [row[p] for row in per_step]
        record[f"{p}_s_max"] = max(values)
        record[f"{p}_s_median"] = statistics.median(values)
        record[f"{p}_s_min"] = min(values)
    return Interval(loss, record, per_step, busy)


class Stragglers:
    """Names a rank on the console once per episode: slower than the median of the other
    ranks by more than `ratio` (its time outside the waiting phases, per step) for `intervals`
    log intervals in a row, with the phase where its time went."""

    def __init__(self, ratio: float, intervals: int, where: list[Where]) -> None:
        self.ratio, self.intervals, self.where = ratio, intervals, where
        self.streak = [0] * len(where)

    def update(self, interval: Interval) -> list[str]:
        lines = []
        for r, busy in enumerate(interval.busy):
            others = interval.busy[:r] + interval.busy[r + 1 :]
            median = statistics.median(others) if others else busy
            slow = busy > self.ratio * median and busy - median >= STRAGGLER_FLOOR_S
            self.streak[r] = self.streak[r] + 1 if slow else 0
            if self.streak[r] == self.intervals:  # once, as the episode is confirmed
                lines.append(self._line(r, interval))
        return lines

    def _line(self, r: int, interval: Interval) -> str:
        rows = interval.per_step
        others = rows[:r] + rows[r + 1 :]
        medians = {p: statistics.median(row[p] for row in others) for p in PHASES}
        phase = max((p for p in PHASES if p not in WAITING), key=lambda p: rows[r][p] - medians[p])
        return (
            f"straggler: {self.where[r]}: {DESCRIBE[phase]} {rows[r][phase]:.3f} s/step vs "
            f"median {medians[phase]:.3f} s of the other ranks ({self.intervals} log intervals "
            "in a row; "
            f"metrics field slowest_rank)"
        )


class Ranks:
    """This rank's phases and the log interval's view of every rank (what the engine uses).
    Made inside the process group: it learns where every rank runs, once."""

    def __init__(self, cfg: MonitorConfig, device: torch.device, fault: Fault | None) -> None:
        rank = td.get_rank() if td.is_initialized() else 0
        self.where = where_all(Where.here(rank, detect().local_rank, device))
        self.me = self.where[rank]
        self.phases = Phases(device)
        if fault is not None:
            self.phases.listeners.append(lambda phase, step: fault.enter(phase, step, rank))
        self.stragglers = Stragglers(cfg.straggler_ratio, cfg.straggler_intervals, self.where)

    def interval(
        self, loss_sum: torch.Tensor, loss_count: int, local: dict[str, float]
    ) -> tuple[float, dict[str, float], list[str]]:
        """The interval's mean loss over all ranks, its record (this rank's `local` figures
        from the Throughput meter, and the job's) and the straggler lines to print."""
        seconds = self.phases.read()
        rows = gather(loss_sum, {"loss_count": loss_count, **local, **seconds})
        job = summarize(rows)
        mine = {k: v for k, v in local.items() if k not in COLUMNS}
        return job.loss, mine | job.record, self.stragglers.update(job)
