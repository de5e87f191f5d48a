"""How much of a dataset each node reads per epoch, with one stream and with `data.streams` =
nodes, from the order functions alone (no data read): an ImageNet-like set (1.28 M samples in
shards of 1,000) and a web-scale one (1 B samples), global batch 4,096 and 32,768, 1-512 nodes
of 8 ranks. Also the order's own cost on a rank per epoch: the plan the node's cache follows
(`dealt()` + `schedule()` of the node's ranks; time and peak Python memory) and the mean time
to produce one of the rank's batches.

python -m benchmarks.stream_plan [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine, save
from distnn.data.order import ShardOrder
from distnn.data.streams import StreamOrder

SHARD = 1000
RANKS_PER_NODE = 8
DATASETS = {"ImageNet-like, 1.28 M": 1_281_167, "web-scale, 1 B": 1_000_000_000}


def _order(counts: list[int], global_batch: int, nodes: int, streams: int) -> ShardOrder:
    world = nodes * RANKS_PER_NODE
    args = (counts, global_batch // world, world, 0, 1, 0, 1)
    return StreamOrder(*args, streams) if streams > 1 else ShardOrder(*args)


def plan(n: int, global_batch: int, nodes: int, streams: int) -> dict:
    """Node 0's shards read in epoch 0, as a share of the dataset, and rank 0's costs."""
    counts = [SHARD] * (n // SHARD) + ([n % SHARD] if n % SHARD else [])
    order = _order(counts, global_batch, nodes, streams)
    start = time.perf_counter()
    schedule = order.schedule(range(RANKS_PER_NODE))
    seconds = time.perf_counter() - start
    tracemalloc.start()  # a second plan, traced: tracing slows the first one's clock
    _order(counts, global_batch, nodes, streams).schedule(range(RANKS_PER_NODE))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    read = np.zeros(len(counts), dtype=bool)
    for shards in schedule:
        read[shards] = True
    batches, start = iter(order), time.perf_counter()
    for _ in range(min(20, order.steps)):
        next(batches)
    per_batch = (time.perf_counter() - start) / max(min(20, order.steps), 1)
    share = int(np.asarray(counts)[read].sum()) / n
    return {"shards": int(read.sum()), "share": share, "vs_ideal": share * nodes,
            "trained": order.steps * global_batch / n,
            "plan_s": seconds, "plan_mb": peak / 2**20, "batch_ms": per_batch * 1e3}  # fmt: skip


def run(quick: bool, repeats: int, out: Path) -> dict:
    rows = []
    node_counts = [1, 8, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    datasets = dict(list(DATASETS.items())[:1]) if quick else DATASETS
    for name, n in datasets.items():
        for global_batch in (4096, 32768):
            for nodes in node_counts:
                if global_batch % (nodes * RANKS_PER_NODE):
                    continue
                for streams in sorted({1, nodes}):
                    row = {"dataset": name, "global_batch": global_batch, "nodes": nodes,
                           "streams": streams, **plan(n, global_batch, nodes, streams)}  # fmt: skip
                    print(_line(row), flush=True)
                    rows.append(row)
    return save(out, "stream_plan", {"machine": machine(), "rows": rows}, markdown)


def _line(r: dict) -> str:
    return (
        f"{r['dataset']:22} batch {r['global_batch']:6} nodes {r['nodes']:4} C {r['streams']:4}"
        f"  {r['share']:7.2%} of the data per node ({r['vs_ideal']:6.2f}× 1/nodes)"
        f"  trains on {r['trained']:.1%}"
        f"  plan {r['plan_s']:.2f} s {r['plan_mb']:.0f} MB, {r['batch_ms']:.2f} ms/batch"
    )


def markdown(results: dict) -> str:
    lines = [
        "# Bytes per node per epoch: one stream vs data.streams = nodes",
        "",
        "From the order functions alone (benchmarks/stream_plan.py): node 0's share of the",
        "dataset read in epoch 0, that share × nodes (1.00 = exactly 1/nodes), the share of the",
        "samples an epoch trains on (an epoch is whole global batches; with C streams it leaves",
        "out up to one shard per stream), and rank 0's cost: the plan its node's cache follows",
        "(time, peak Python memory) and one batch.",
        "",
        "| data | global batch | nodes | C | read per node | × 1/nodes | epoch trains | plan s "
        "| plan MB | ms/batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['dataset']} | {r['global_batch']:,} | {r['nodes']} | {r['streams']} | "
            f"{r['share']:.2%} | {r['vs_ideal']:.2f} | {r['trained']:.1%} | {r['plan_s']:.2f} | "
            f"{r['plan_mb']:.0f} | "
            f"{r['batch_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_plan", description=__doc__)
    p.add_argument("--quick", action="store_true", help="ImageNet-like only, 1, 8, 64 nodes")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    run(args.quick, 1, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
