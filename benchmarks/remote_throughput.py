"""Shard loader samples/s from a local S3 server against the same shards on local disk.

    python -m benchmarks.remote_throughput [--quick] [--repeats 5] [--out benchmarks/results]

The images of benchmarks/data_throughput.py (32 px PNG; ImageNet-like JPEG, 350-500 px), sharded
(256 a shard) and uploaded to moto's S3 server on 127.0.0.1 (tests/object_store.py), read
through distnn's own loader (data.root=s3://..., the node-local cache, prefetch) with 1 and 2
workers. Cold: a fresh cache each pass, so every shard is downloaded during the epoch; the
local pass it is compared with also builds its loaders afresh. Warm: the cache already holds
the shards (loaders built once, as the local ones). Each pair runs local, S3, S3, local, …
(ABBA) after a warm-up pass; the figure is the median with min and max, and the ratio is S3's
median over local's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import describe, machine, parser, save, spread, summarize
from benchmarks.data_throughput import KINDS, make_images, shard_loader


def abba(a: Callable[[], Callable[[], int]], b: Callable[[], Callable[[], int]],
         repeats: int) -> tuple[dict, dict]:  # fmt: skip
    """Samples/s of a() and b() passes (each makes its pass, then it is timed), ABBA order."""
    rates: dict[str, list[float]] = {"a": [], "b": []}
    for k in range(repeats):
        for which in "ab" if k % 2 == 0 else "ba":
            make = a if which == "a" else b
            run = make()
            start = time.perf_counter()
            n = run()
            rates[which].append(n / (time.perf_counter() - start))
    return summarize(rates["a"]), summarize(rates["b"])


def run(quick: bool, repeats: int, out: Path) -> dict:
    from distnn.data import shard
    from tests.object_store import S3Server

    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats, "rows": []}
    # The loaders' fetch threads and workers live until the process ends: a download may
    # still be landing in a cache while the directory goes.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        for kind, (ext, size, batch, n_full, n_quick) in KINDS.items():
            src, shards = base / f"{ext}_src", base / f"{ext}_shards"
            make_images(src, ext, n_quick if quick else n_full)
            shard.shard("imagefolder", src, shards, max_count=256, workers=2)
            server = S3Server(base / "moto.log", shards, ext, gated=False)
            os.environ.update(server.env)
            try:
                for workers in (1, 2):
                    results["rows"] += measure(kind, server.root, shards, size, batch, workers,
                                               repeats, base)  # fmt: skip
            finally:
                server.stop()
    return save(out, "remote_throughput", results, markdown)


def measure(kind: str, url: str, local: Path, size: int, batch: int, workers: int,
            repeats: int, tmp: Path) -> list[dict]:  # fmt: skip
    caches = iter(range(1_000_000))

    def remote(cache: Path) -> Callable[[], int]:
        return shard_loader(url, size, batch, workers, f"data.cache_dir={cache}")

    def fresh_local() -> Callable[[], int]:
        return shard_loader(local, size, batch, workers)

    def cold() -> Callable[[], int]:
        return remote(tmp / f"cold{next(caches)}")

    built_local = shard_loader(local, size, batch, workers)
    built_remote = remote(tmp / "warm")
    built_local(), built_remote()  # warm-up: page cache, workers, the warm cache filled
    rows = []
    for label, (a, b) in {
        "cold": (fresh_local, cold),
        "warm": (lambda: built_local, lambda: built_remote),
    }.items():
        here, s3 = abba(a, b, repeats)
        row = {"data": kind, "cache": label, "workers": workers, "local": here, "s3": s3,
               "ratio": s3["median"] / here["median"]}  # fmt: skip
        print(f"{kind:20} {label} workers={workers}: local {here['median']:8.0f}, "
              f"S3 {s3['median']:8.0f} samples/s ({row['ratio']:.2f}×)", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Shards from a local S3 server vs local disk (samples/s, training transforms)",
        "",
        f"{describe(m)}{' (quick run)' if results['quick'] else ''} moto's S3 server on "
        f"127.0.0.1, read by s3fs into the node-local cache. Median of {results['repeats']} "
        "passes per side, ABBA order, after a warm-up (min – max).",
        "",
        "| data | cache | workers | local disk | S3 | S3 ÷ local |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['data']} | {r['cache']} | {r['workers']} | {spread(r['local'])} "
        f"| {spread(r['s3'])} | {r['ratio']:.2f} |"
        for r in results["rows"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser("benchmarks.remote_throughput", __doc__, "a CI-sized run (fewer images)")
    args = p.parse_args(argv)
    run(args.quick, args.repeats, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
