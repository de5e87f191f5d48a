"""`make bench`: every benchmark, results under benchmarks/results/ (BENCH=quick: CI-sized).

python -m benchmarks.run [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import data_throughput, train_throughput
from benchmarks.common import RESULTS

BENCHMARKS = {"data_throughput": data_throughput, "train_throughput": train_throughput}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="CI-sized runs")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per figure")
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run just these")
    args = p.parse_args(argv)
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        module = BENCHMARKS[name]
        print(module.markdown(module.run(args.quick, args.repeats, RESULTS)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
