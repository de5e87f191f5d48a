"""Profiles on demand: `prof.steps=START:END` records a torch.profiler window on the ranks in
`prof.ranks` (default all).

The window listens to the loop's phase transitions (monitor/ranks.py): it starts as the rank
enters step START's data phase, labels each phase with `record_function("distnn.<phase>")`
(the names of the per-rank timings, so a trace and metrics.jsonl speak of the same things)
and stops as step END's optimizer phase ends. Each rank writes one gzip'd Chrome/Perfetto trace,
`<run dir>/profile/rank_<R>.pt.trace.json.gz` (ui.perfetto.dev, chrome://tracing, or
TensorBoard's profiler plugin pointed at <run dir>/profile), and a table of the top ops by self
time beside it; rank 0 prints its table. Outside the window the profiler is not running and
the listener is one comparison per transition; after it, the listener is gone.

`prof.memory_snapshot=true` (CUDA) records the allocator's history over the window (or the
whole run when there is no window) and writes `memory_rank_<R>.pickle` for
pytorch.org/memory_viz at its end and on an out-of-memory error.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from distnn.config import ProfConfig
from distnn.monitor.ranks import Phases


class Window:
    def __init__(
        self,
        cfg: ProfConfig,
        phases: Phases,
        rank: int,
        run_dir: Path,
        device: torch.device,
        message: Callable[[str], None],
    ) -> None:
        self.cfg, self.phases, self.rank, self.device = cfg, phases, rank, device
        self.dir = run_dir / "profile"
        self.message = message
        self.window = cfg.window
        self.prof: profile | None = None
        self.label: record_function | None = None
        self.main = threading.get_ident()  # labels only there: a range closes where it opened
        self.memory = cfg.memory_snapshot and device.type == "cuda"
        if self.memory:
            torch._C._cuda_attach_out_of_memory_observer(self._out_of_memory)
            if self.window is None:
                self._record_memory(True)
        if self.window is not None:
            phases.listeners.append(self.enter)

    def enter(self, phase: str, step: int) -> None:
        first, last = self.window
        if self.prof is None:
            if phase == "data" and step == first:
                self._start()
            else:
                return
        elif (phase == "data" and step > last) or (phase == "stall" and step >= last):
            self.close()
            return
        if threading.get_ident() != self.main:
            return  # CUDA's autograd thread marks comm: its time stays in compute's label
        self._unlabel()
        self.label = record_function(f"distnn.{phase}")
        self.label.__enter__()

    def _unlabel(self) -> None:
        if self.label is not None:
            self.label.__exit__(None, None, None)
            self.label = None

    def _start(self) -> None:
        if self.device.type == "cpu":  # else kineto logs an ERROR line for the GPU it lacks
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=activities, profile_memory=True)
        self.prof.start()
        if self.memory:
            self._record_memory(True)

    def close(self) -> None:
        """End the window (early, where the run ends inside it) and write what it holds."""
        if self.enter in self.phases.listeners:
            self.phases.listeners.remove(self.enter)
        if self.memory:
            self._dump_memory()
            self._record_memory(False)
            self.memory = False
        if self.prof is None:
            return
        self._unlabel()
        prof, self.prof = self.prof, None
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"rank_{self.rank}.pt.trace.json.gz"
        prof.export_chrome_trace(str(trace))
        with contextlib.suppress(AttributeError):  # torch without the CUPTI monitor's exports
            prof.wait_for_exports()
        by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=by, row_limit=self.cfg.top_ops)
        (self.dir / f"rank_{self.rank}_ops.txt").write_text(table + "\n")
        first, last = self.window
        self.message(f"profile of steps {first}-{last}: {trace} (top ops by self time)\n{table}")

    def _record_memory(self, on: bool) -> None:
        torch.cuda.memory._record_memory_history(max_entries=100_000 if on else 0,
                                                 enabled="all" if on else None)  # fmt: skip

    def _dump_memory(self, suffix: str = "") -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"memory_rank_{self.rank}{suffix}.pickle"
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)

    def _out_of_memory(self, *_: Any) -> None:
        self._dump_memory("_oom")


def wanted(cfg: ProfConfig, rank: int, device: torch.device) -> bool:
    """Whether this rank has a window to record (or, on CUDA, memory to snapshot)."""
    asked = cfg.window is not None or (cfg.memory_snapshot and device.type == "cuda")
    return asked and (cfg.ranks is None or rank in cfg.ranks)
