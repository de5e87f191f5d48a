"""`make bench`: every benchmark, then results/README.md with tables and plots
(BENCH=quick: CI-sized).

python -m benchmarks.run [--quick] [--repeats 5] [--only NAME ...] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import data_throughput, end_to_end, recipes, report, train_throughput, zero_memory
from benchmarks.common import RESULTS, positive_int

BENCHMARKS = {
    "data_throughput": data_throughput,
    "train_throughput": train_throughput,
    "zero_memory": zero_memory,
    "end_to_end": end_to_end,
    "recipes": recipes,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="CI-sized runs")
    p.add_argument(
        "--repeats", type=positive_int, help="timed passes per figure (default 5; 2 quick)"
    )
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run just these")
    p.add_argument(
        "--out", type=Path, help="results folder (default results/, quick: results/quick/)"
    )
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    # A quick run must not overwrite the recorded figures.
    args.out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        module, start = BENCHMARKS[name], time.perf_counter()
        print(module.markdown(module.run(args.quick, args.repeats, args.out)), flush=True)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{args.out / 'README.md'}: {', '.join(report.write(args.out))}")


if __name__ == "__main__":
    main(sys.argv[1:])
