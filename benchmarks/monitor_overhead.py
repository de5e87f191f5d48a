"""What seeing inside a run costs: per-rank phase timing, its all-gather and the watchdog, per
optimizer step, against the same loop without them.

    python -m benchmarks.monitor_overhead [--quick] [--repeats 8] [--out benchmarks/results]

Each row builds distnn's Engine three times on the same model, batch and in-memory batches
(benchmarks/train_throughput.Case, logging every 10 steps):
- unwatched: the loop as it was before issue 31 — phase transitions do nothing, and a log
  interval all-reduces the loss alone; no watchdog, no comm hook (DDP's built-in all-reduce);
- watched: as shipped — phases timed, every rank's figures all-gathered each log interval,
  the watchdog's thread beating into the store, DDP's comm hook marking the comm phase;
- + idle profiler: watched, with a prof.steps window that never comes (the listener that
  waits for it).
Timed passes rotate ABC CBA after a warm-up of each; per pass microseconds per step; the
overhead is each variant minus unwatched, per rotation. Rows: the tutorial CNN (32 px,
batch 32) and one Linear layer (8 px, batch 64), each in one process and on 2 processes (DDP
over gloo on CPU, one thread each; rank 0's figures).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch.nn.parallel import DistributedDataParallel

from benchmarks.common import (
    describe,
    machine,
    main_with_plan,
    save,
    spread,
    summarize,
    torchrun_job,
)  # fmt: skip
from benchmarks.train_throughput import Case
from distnn import config, monitor, parallel
from distnn.engine import Engine
from distnn.monitor import ranks
from distnn.parallel import dist

VARIANTS = ("unwatched", "watched", "idle_profiler")


class Unmarked(ranks.Phases):
    def enter(self, phase: str, step: int) -> None:
        pass


class Unwatched:
    """The log interval of the loop before issue 31: the loss all-reduced, rank 0's rates."""

    def __init__(self) -> None:
        self.phases = Unmarked()

    def interval(
        self, loss_sum: torch.Tensor, loss_count: int, local: dict[str, float]
    ) -> tuple[float, dict[str, float], list[str]]:
        count = torch.tensor(float(loss_count), device=loss_sum.device)
        totals = dist.all_reduce_sum(torch.stack([loss_sum, count]))
        rate = local["images_per_sec_per_device"] * dist.world_size()
        return (totals[0] / totals[1]).item(), {**local, "images_per_sec": rate}, []


@contextlib.contextmanager
def variant(case: Case, name: str) -> Iterator[Engine]:
    # Unwatched DDP keeps its built-in all-reduce: the comm hook is what "watched" adds.
    hook = mock.patch.object(DistributedDataParallel, "register_comm_hook")
    with hook if name == "unwatched" else contextlib.nullcontext():
        engine, _ = case.distnn()
    if name == "unwatched":
        engine.ranks = Unwatched()
        engine.phases = engine.ranks.phases
        yield engine
        engine.run.close()
        return
    if name == "idle_profiler":
        case.cfg.prof.steps = f"{10**9}:{10**9}"
    cfg = case.cfg
    with monitor.watch(cfg, engine.ranks, engine.run, case.device, lambda: False):
        yield engine
    cfg.prof.steps = ""
    engine.run.close()


def measure(model: str, size: int, batch: int, steps: int, repeats: int, run_dir: Path) -> dict:
    case = Case(model, size, batch, "fp32", steps, run_dir=run_dir, log_every=10)
    us: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with contextlib.ExitStack() as stack:
        engines = {name: stack.enter_context(variant(case, name)) for name in VARIANTS}
        for name in VARIANTS:  # warm-up
            case.run_distnn(engines[name])
        for i in range(repeats):
            order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
            for name in order:
                dist.barrier()
                t = time.perf_counter()
                case.run_distnn(engines[name])
                us[name].append((time.perf_counter() - t) / steps * 1e6)
    base = us["unwatched"]
    return {
        "model": model, "image_size": size, "batch": batch, "steps": steps, "log_every": 10,
        "world_size": dist.world_size(), "order": "ABC CBA",
        **{f"{name}_us_per_step": summarize(us[name]) for name in VARIANTS},
        **{f"{name}_overhead_us": summarize([a - b for a, b in zip(us[name], base, strict=True)])
           for name in VARIANTS[1:]},
        "watched_overhead_share": summarize(
            [(a - b) / b for a, b in zip(us["watched"], base, strict=True)]),
    }  # fmt: skip


def worker(out: str, plan: list[list], repeats: int) -> None:
    """One of the 2 torchrun processes: the 2-process rows; rank 0 writes them."""
    env = parallel.detect()
    with tempfile.TemporaryDirectory() as tmp, dist.process_group(env, config.load(None).dist):
        rows = [measure(*row, repeats, Path(tmp)) for row in plan]
    if env.is_main:
        Path(out).write_text(json.dumps(rows))


def run(quick: bool, repeats: int, out: Path) -> dict:
    steps = 20 if quick else 200
    plan = [["tutorial_cnn", 32, 32, steps // 4], ["linear", 8, 64, steps * 5]]
    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for row in plan:
            results["rows"].append(measure(*row, repeats, Path(tmp)))
            print(line(results["rows"][-1]), flush=True)
    args = [f"--plan={json.dumps(plan)}", f"--repeats={repeats}"]
    rows = torchrun_job("benchmarks.monitor_overhead", 2, args, timeout=900 + 120 * repeats,
                        OMP_NUM_THREADS="1")  # fmt: skip
    for row in rows:
        results["rows"].append(row)
        print(line(row), flush=True)
    return save(out, "monitor_overhead", results, markdown)


def line(r: dict) -> str:
    return (
        f"{r['model']:12} x{r['world_size']}: unwatched {r['unwatched_us_per_step']['median']:.0f}"
        f" us/step, watched {spread(r['watched_overhead_us'], '+.1f')} us, idle profiler "
        f"{spread(r['idle_profiler_overhead_us'], '+.1f')} us"
    )


def markdown(results: dict) -> str:
    lines = [
        "# What per-rank timing, its all-gather and the watchdog cost per step",
        "",
        f"{describe(results['machine'])}{' (quick run)' if results['quick'] else ''} "
        f"{results['repeats']} rotations (ABC CBA) after a warm-up of each; log every 10 steps; "
        "median (min – max) microseconds per optimizer step. Overhead: the variant minus "
        "unwatched (the loop without phase timing, gather, watchdog or comm hook), per "
        "rotation. Goal: watched ≤ +10 µs/step, and ≤ 1 % of the tutorial CNN's step.",
        "",
        "| model | processes | unwatched µs/step | watched overhead µs | share of step "
        "| idle profiler overhead µs |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} {r['image_size']} px, batch {r['batch']} | {r['world_size']} "
            f"| {spread(r['unwatched_us_per_step'])} | {spread(r['watched_overhead_us'], '+.1f')}"
            f" | {spread(r['watched_overhead_share'], '+.2%')} "
            f"| {spread(r['idle_profiler_overhead_us'], '+.1f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    main_with_plan("benchmarks.monitor_overhead", __doc__, "a CI-sized run (few steps)", worker,
                   run, argv)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
