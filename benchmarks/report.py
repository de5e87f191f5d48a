"""results/README.md and PNG plots from the benchmarks' JSON files.

    python -m benchmarks.report [--out benchmarks/results]

Reads whichever of data_throughput, train_throughput, zero_memory, end_to_end and recipes .json
are in the folder; `make bench` calls it after running them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster or in CI
import matplotlib.pyplot as plt

from benchmarks.common import RESULTS

ORDER = ("data_throughput", "train_throughput", "zero_memory", "end_to_end", "recipes")
GiB = 2**30


def _errors(stats: list[dict]) -> list[list[float]]:
    """min/max as matplotlib's yerr: distances below and above the median."""
    return [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]


def plot_data(results: dict, ax: plt.Axes) -> None:
    """Samples/s against workers, one line per data kind and pipeline."""
    lines: dict[tuple[str, str], list[dict]] = {}
    for r in results["rows"]:
        lines.setdefault((r["data"], r["pipeline"]), []).append(r)
    for (data, pipeline), rows in lines.items():
        rows.sort(key=lambda r: r["workers"])
        style = "-" if "PNG" in data else "--"
        ax.errorbar([r["workers"] for r in rows], [r["median"] for r in rows],
                    yerr=_errors(rows), fmt=style + "o", capsize=3,
                    label=f"{data}: {pipeline}")  # fmt: skip
    workers = sorted({r["workers"] for r in results["rows"]})
    ax.set(xlabel="DataLoader workers", ylabel="samples/s", yscale="log", xticks=workers,
           title="Data loading throughput")  # fmt: skip
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))


def plot_scaling(results: dict, ax: plt.Axes) -> None:
    """Speed-up over 1 process at 2, against perfect scaling: every model on one scale."""
    for r in results["scaling"]:
        one = r["one"]["median"]
        two = [r["two"][k] / one for k in ("median", "min", "max")]
        ax.errorbar([1, 2], [1, two[0]], yerr=[[0, two[0] - two[1]], [0, two[2] - two[0]]],
                    fmt="-o", capsize=3,
                    label=f"{r['model']}, accum {r['accum']}: {r['efficiency']:.2f}")  # fmt: skip
    ax.plot([1, 2], [1, 2], "k:", label="perfect")
    ax.set(xlabel="processes (1 thread each)", ylabel="images/s ÷ 1 process", xticks=[1, 2],
           title="Weak scaling, DDP over gloo")  # fmt: skip
    ax.legend(fontsize=7, title="efficiency", title_fontsize=7)


def plot_memory(results: dict, ax: plt.Axes) -> None:
    """Per-rank GiB: the formula, build + setup, the peak and what stays resident, per
    strategy."""
    rows = results["rows"]
    x = range(len(rows))
    bars = [("setup_bytes", "build + setup"), ("peak_bytes", "peak of the steps"),
            ("resident_bytes", "resident after steps")]  # fmt: skip
    bars = [b for b in bars if b[0] in rows[0]]  # results from before setup was measured
    width = 0.8 / (len(bars) + 1)
    ax.bar([j - 0.4 + width / 2 for j in x], [r["predicted_bytes"] / GiB for r in rows], width,
           label="formula")  # fmt: skip
    for i, (key, label) in enumerate(bars, 1):
        stats = [{k: v / GiB for k, v in r[key].items() if k != "runs"} for r in rows]
        ax.bar([j - 0.4 + width * (i + 0.5) for j in x], [s["median"] for s in stats], width,
               yerr=_errors(stats), capsize=2, label=label)  # fmt: skip
    ax.set_xticks(list(x), [r["case"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="GiB per rank",
           title=f"Memory per rank, {rows[0]['params'] / 1e6:.0f} M params")  # fmt: skip
    ax.legend(fontsize=7)


def plot_end_to_end(results: dict, ax: plt.Axes) -> None:
    rows = results["rows"]
    for i, (key, label) in enumerate((("seconds_to_target", "to target"),
                                      ("wall_s", "launch to exit"))):  # fmt: skip
        stats = [r[key] for r in rows]
        ax.bar([j + (i - 0.5) * 0.4 for j in range(len(rows))], [s["median"] for s in stats],
               0.4, yerr=_errors(stats), capsize=3, label=label)  # fmt: skip
    ax.set_xticks(range(len(rows)), [f"{r['processes']} process(es)" for r in rows])
    ax.set(ylabel="seconds", title=f"Digits to val top-1 {results['target_val_top1']}")
    ax.legend(fontsize=7)


def plot_recipes(results: dict, ax: plt.Axes) -> None:
    """Val top-1 minus plain's at the same seed, per config and model: mean ± standard
    deviation, each seed a dot; under each config the cost of a step × plain's, per model."""
    rows = [r for r in results["rows"] if r["config"] != "plain"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    names = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["config"]): r for r in rows}
    costs = {(c["model"], c["config"]): c["ratio"]["median"] for c in results["cost"]}
    width = 0.8 / len(names)
    for i, model in enumerate(names):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(configs))]
        deltas = [by[(model, c)]["vs_plain"] for c in configs]
        bars = ax.bar(xs, [100 * d["mean"] for d in deltas], width * 0.9,
                      yerr=[100 * d["std"] for d in deltas], capsize=2, alpha=0.6,
                      label=model)  # fmt: skip
        for x, d in zip(xs, deltas, strict=True):
            ax.plot([x] * len(d["runs"]), [100 * v for v in d["runs"]], ".", ms=3,
                    color=bars.patches[0].get_facecolor(), alpha=1.0)  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    labels = [
        c.replace("_", "\n").replace(" (", "\n(")
        + "".join(f"\n×{costs[(m, c)]:.2f}" for m in names if (m, c) in costs)
        for c in configs
    ]
    ax.set_xticks(range(len(configs)), labels, rotation=0, fontsize=6)
    ax.set(ylabel="val top-1 − plain, points (same seed)",
           title="Recipe pieces on 20% of the digits (× = cost per step ÷ plain)")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)


PLOTS: dict[str, Callable[[dict, plt.Axes], None]] = {
    "data_throughput": plot_data,
    "train_throughput": plot_scaling,
    "zero_memory": plot_memory,
    "end_to_end": plot_end_to_end,
    "recipes": plot_recipes,
}


def write(out: Path) -> list[str]:
    """results/README.md with every table and a plot beside each; the names it covered."""
    out.mkdir(parents=True, exist_ok=True)
    found = [name for name in ORDER if (out / f"{name}.json").is_file()]
    parts = ["# Benchmark results", "",
             "Written by `make bench` (`python -m benchmarks.run`); each section is the "
             "benchmark's own table, with the machine and commit it ran on.", ""]  # fmt: skip
    for name in found:
        results = json.loads((out / f"{name}.json").read_text())
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        PLOTS[name](results, ax)
        fig.savefig(out / f"{name}.png", bbox_inches="tight")  # legends outside included
        plt.close(fig)
        table = (out / f"{name}.md").read_text().strip()
        parts += ["#" + table, "", f"![{name}]({name}.png)", ""]  # each title one level down
    (out / "README.md").write_text("\n".join(parts))
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("--out", type=Path, default=RESULTS, help="the results folder")
    args = p.parse_args(argv)
    print(f"{args.out / 'README.md'}: {', '.join(write(args.out)) or 'no results'}")


if __name__ == "__main__":
    main(sys.argv[1:])
