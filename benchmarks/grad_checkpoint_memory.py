"""Activation checkpointing: the memory a training step takes and its time, with and without.

Each pass is a fresh process (a peak is a high-water mark: one process per figure) that builds
ResNet-50 at 224 px through distnn's models.prepare (model.grad_checkpointing on or off), SGD
with momentum, and runs `steps` training steps of batch 8 on random images. Memory: on CUDA
torch.cuda.max_memory_allocated over the steps; on CPU the process's peak RSS minus its RSS
before the first step (activations, gradients and momentum; the allocator's caching
included). Time: the median step after the first. Passes alternate plain, checkpointed,
checkpointed, plain (ABBA).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, describe, machine, parser, save, spread, summarize
from distnn import config, models

VARIANTS = ("plain", "checkpointed")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_pass(model: str, size: int, batch: int, steps: int, on: bool) -> dict:
    """In this process: one variant's step memory (MiB) and median step time (s)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config.load(None, [f"model.name={model}", f"data.image_size={size}",
                             f"model.grad_checkpointing={str(on).lower()}"])  # fmt: skip
    torch.manual_seed(0)
    net, _, _ = models.prepare(cfg, 1000, device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        memory = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:  # ru_maxrss: KiB on Linux
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"memory_mib": memory, "step_s": statistics.median(times[1:] or times)}


def run(quick: bool, repeats: int, out: Path) -> dict:
    model, size, batch, steps = ("resnet18", 32, 8, 2) if quick else ("resnet50", 224, 8, 4)
    figures: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "pass.json"
        for i in range(repeats):
            for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                plan = [model, size, batch, steps, variant == "checkpointed"]
                subprocess.run([sys.executable, "-m", "benchmarks.grad_checkpoint_memory",
                                f"--worker={result}", f"--plan={json.dumps(plan)}"],
                               check=True, timeout=900, cwd=RESULTS.parents[1])  # fmt: skip
                figures[variant].append(json.loads(result.read_text()))
    row = {"model": model, "image_size": size, "batch": batch, "steps": steps,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "order": "ABBA"}  # fmt: skip
    for v in VARIANTS:
        row[f"{v}_memory_mib"] = summarize([f["memory_mib"] for f in figures[v]])
        row[f"{v}_step_s"] = summarize([f["step_s"] for f in figures[v]])
    pairs = list(zip(figures["plain"], figures["checkpointed"], strict=True))
    row["memory_ratio"] = summarize([c["memory_mib"] / p["memory_mib"] for p, c in pairs])
    row["time_ratio"] = summarize([c["step_s"] / p["step_s"] for p, c in pairs])
    results = {"machine": machine(), "quick": quick, "repeats": repeats, "rows": [row]}
    print(f"{model} {size} px, batch {batch}: memory x{spread(row['memory_ratio'], '.2f')}, "
          f"step time x{spread(row['time_ratio'], '.2f')}")  # fmt: skip
    return save(out, "grad_checkpoint_memory", results, markdown)


def markdown(results: dict) -> str:
    lines = [
        "# Activation checkpointing: a step's memory and time",
        "",
        f"{describe(results['machine'])}{' (quick run)' if results['quick'] else ''} "
        f"{results['repeats']} passes, each a fresh process, ABBA; median (min – max). Memory: "
        "CUDA's peak allocated over the steps, or on CPU peak RSS minus RSS before the first "
        "step. Goal: memory ≤ 0.6×; expected step time 1.2-1.35×.",
        "",
        "| model | device | plain MiB | checkpointed MiB | memory × | plain s/step "
        "| checkpointed s/step | time × |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} {r['image_size']} px, batch {r['batch']} | {r['device']} "
            f"| {spread(r['plain_memory_mib'])} | {spread(r['checkpointed_memory_mib'])} "
            f"| {spread(r['memory_ratio'], '.2f')} | {spread(r['plain_step_s'], '.2f')} "
            f"| {spread(r['checkpointed_step_s'], '.2f')} | {spread(r['time_ratio'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser("benchmarks.grad_checkpoint_memory", __doc__, "ResNet-18 at 32 px, 2 steps")
    p.add_argument("--plan", help="one pass (internal)")
    args = p.parse_args(argv)
    if args.worker:
        Path(args.worker).write_text(json.dumps(one_pass(*json.loads(args.plan))))
        return
    run(args.quick, args.repeats, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
