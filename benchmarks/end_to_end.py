"""End to end: time to a target accuracy on the demo's digits, 1 process against 2.

    python -m benchmarks.end_to_end [--quick] [--repeats 5] [--out benchmarks/results]

scikit-learn's bundled handwritten digits (1,797 real scans, the data of `make demo`) as
32 px PNG webdataset shards, trained with configs/digits.yaml (tutorial CNN, SGD + cosine,
15 epochs, an evaluation each epoch) at the same global batch of 64 both ways:
`python -m distnn.train` (1 process, every core) and `torchrun --nproc_per_node=2` (DDP over
gloo, one thread each). Per run: seconds of training until val top-1 first reaches the target
(the `elapsed_s` of that evaluation in metrics.jsonl), seconds from launch to exit (imports,
process group and data included), and the final val top-1. Repeat i runs both with
train.seed=i: the two see different sample orders at one seed (each rank reads its own
shards), so the epochs to the target differ by seed as much as by process count; medians over
seeds compare them. Median, min and max; speed-up = 1-process seconds ÷ 2-process seconds.
Writes results/end_to_end.json and .md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, describe, machine, parser, save, summarize
from distnn.data import digits, shard
from distnn.monitor import read_metrics

ROOT = RESULTS.parents[1]
TARGET, QUICK_TARGET = 0.95, 0.5
LAUNCHERS = {
    1: [sys.executable, "-m", "distnn.train"],
    2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "distnn.train"],
}  # fmt: skip


def make_shards(tmp: Path) -> Path:
    images, shards = tmp / "digits", tmp / "digits_shards"
    digits.write(images)
    shard.shard("imagefolder", images, shards, max_count=250)
    return shards


def train_once(nproc: int, seed: int, shards: Path, runs: Path, quick: bool) -> dict:
    name = f"p{nproc}-seed{seed}"
    overrides = [f"data.root={shards}", f"run.dir={runs}", f"run.name={name}", f"train.seed={seed}",
                 "train.global_batch=64", "log.progress=off", "log.wandb.mode=disabled",
                 "log.tensorboard=false", "ckpt.resume=never"]  # fmt: skip
    if quick:
        overrides.append("train.epochs=2")
    cmd = [*LAUNCHERS[nproc], "--config", "configs/digits.yaml", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun sets 1
    start = time.perf_counter()
    done = subprocess.run(cmd, timeout=1800, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")
    wall = time.perf_counter() - start
    target = QUICK_TARGET if quick else TARGET
    evals = [r for r in read_metrics(runs / name) if "val_top1" in r]
    reached = next((r for r in evals if r["val_top1"] >= target), None)
    return {
        "seconds_to_target": reached["elapsed_s"] if reached else None,
        "epochs_to_target": reached["epoch"] if reached else None,
        "wall_s": wall,
        "final_val_top1": evals[-1]["val_top1"],
    }


def run(quick: bool, repeats: int, out: Path) -> dict:
    repeats = 1 if quick else repeats
    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats,
                     "target_val_top1": QUICK_TARGET if quick else TARGET,
                     "global_batch": 64, "rows": []}  # fmt: skip
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp))
        for i in range(repeats):
            for nproc in runs:
                got = train_once(nproc, i, shards, Path(tmp) / "runs", quick)
                runs[nproc].append(got)
                print(f"{nproc} process(es), run {i + 1}/{repeats}: {got}", flush=True)
    for nproc, got in runs.items():
        times = [g["seconds_to_target"] for g in got]
        results["rows"].append({
            "processes": nproc,
            "reached": sum(t is not None for t in times),
            "seconds_to_target": summarize([t for t in times if t is not None] or [float("nan")]),
            "epochs_to_target": summarize([g["epochs_to_target"] or float("nan") for g in got]),
            "wall_s": summarize([g["wall_s"] for g in got]),
            "final_val_top1": summarize([g["final_val_top1"] for g in got]),
        })  # fmt: skip
    one, two = results["rows"]
    results["speedup_to_target"] = (
        one["seconds_to_target"]["median"] / two["seconds_to_target"]["median"]
    )
    results["speedup_wall"] = one["wall_s"]["median"] / two["wall_s"]["median"]
    return save(out, "end_to_end", results, markdown)


def _cell(stats: dict, fmt: str) -> str:
    return f"{stats['median']:{fmt}} ({stats['min']:{fmt}} – {stats['max']:{fmt}})"


def markdown(results: dict) -> str:
    lines = [
        "# End to end: time to target accuracy on the digits",
        "",
        f"{describe(results['machine'])}{' (quick run)' if results['quick'] else ''} "
        f"configs/digits.yaml, global batch {results['global_batch']}, target val top-1 "
        f"{results['target_val_top1']}; median of {results['repeats']} (min – max).",
        "",
        "| processes | reached | s to target | epochs to target | launch to exit s "
        "| final val top-1 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['processes']} | {r['reached']}/{results['repeats']} "
            f"| {_cell(r['seconds_to_target'], '.1f')} | {_cell(r['epochs_to_target'], '.0f')} "
            f"| {_cell(r['wall_s'], '.1f')} | {_cell(r['final_val_top1'], '.4f')} |"
        )
    lines += ["", f"Speed-up of 2 processes: {results['speedup_to_target']:.2f}× to the target, "
              f"{results['speedup_wall']:.2f}× launch to exit."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser(
        "benchmarks.end_to_end",
        __doc__,
        "2 epochs, one run each, target 0.5",
        "runs per process count (>= 5)",
    )
    args = p.parse_args(argv)
    print(markdown(run(args.quick, args.repeats, args.out)))


if __name__ == "__main__":
    main(sys.argv[1:])
