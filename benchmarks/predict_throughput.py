"""Prediction samples/s on 1 rank vs 2 ranks, in the same 2 processes.

Both variants run distnn.predict's hot loop (inference.loader over order.Parts, the Predictor's
forward and softmax, predictions.rows) on the same data with the same model: "1 rank" is rank
0 alone with every part (world size 1; rank 1 waits at the barrier), "2 ranks" both ranks with
the parts dealt between them. Timed from a barrier to a barrier (the slower rank ends the
pass); passes alternate 1 2 2 1 (ABBA) after a warm-up of each. Rows: the digits' val split in
shards (32 px PNG, the tutorial CNN) and JPEGs of 500 × 375 (decoded, resized to 146 and
centre-cropped to 128 by the eval transform; the same CNN at 128 px). One reader thread per rank
(data.workers=0, one intra-op thread): the 2-rank figure is what a second core buys.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import (
    describe,
    machine,
    main_with_plan,
    save,
    spread,
    summarize,
    torchrun_job,
)  # fmt: skip
from distnn import config, inference, models, parallel
from distnn.data.errors import DataErrors
from distnn.parallel import dist
from distnn.parallel.env import Env
from distnn.predictions import rows

VARIANTS = (1, 2)  # ranks


def write_data(root: Path, quick: bool) -> dict[str, list[str]]:
    """The rows' data: digits shards and a folder of JPEGs; their data.* keys."""
    from distnn.data import digits, shard

    digits.write(root / "digits")
    shard.main(["imagefolder", str(root / "digits"), str(root / "shards"), "--max-count=150"])
    rng = np.random.default_rng(0)
    folder = root / "jpegs" / "val" / "0"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(48 if quick else 384):
        f = rng.uniform(0.005, 0.05, 3)
        pixels = np.stack([128 + 100 * np.sin(f[c] * (xx + yy * (c + 1)) + i) for c in range(3)])
        noisy = pixels.transpose(1, 2, 0) + rng.normal(0, 12, (375, 500, 3))
        image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        image.save(folder / f"{i:04d}.jpg", quality=90)
        if i < 10:  # the classes "0".."9", as the digits'
            (root / "jpegs" / "train" / str(i)).mkdir(parents=True)
            image.save(root / "jpegs" / "train" / str(i) / "0.jpg", quality=90)
    # Batches of 64 and 16 in parts of one batch: 6 and 24 parts (3 in a quick run), dealt
    # between the ranks.
    return {
        "digits shards, 32 px": ["64", "data.source=shards", f"data.root={root / 'shards'}",
                                 "data.image_size=32"],
        "JPEG 500 × 375 → 128 px": ["16", "data.source=imagefolder",
                                    f"data.root={root / 'jpegs'}", "data.image_size=128"],
    }  # fmt: skip


def state_for(keys: list[str]) -> dict:
    """An export-like state: the tutorial CNN at the data's size, untrained (speed only)."""
    cfg = config.load(None, ["model.name=tutorial_cnn", "data.workers=0", *keys])
    classes = [str(c) for c in range(10)]
    model = models.build_named("tutorial_cnn", 10, cfg.data.image_size, {})
    return {"config": config.to_dict(cfg), "classes": classes, "model": model.state_dict(),
            "mean": (128.0,) * 3, "std": (64.0,) * 3}  # fmt: skip


def measure(name: str, batch: int, keys: list[str], repeats: int) -> dict:
    env = parallel.detect()
    state = state_for(keys)
    predictor = inference.Predictor(state, torch.device("cpu"))
    inputs = inference.open_inputs(keys, state, env)
    n = len(inputs.split)
    size = batch  # parts of one batch: whole batches (order.part_size would cut 359 into 6s)
    keys_of = [inputs.split.key(i) for i in range(n)]

    def one_pass(ranks: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        if env.rank < ranks:
            me = Env(rank=env.rank, world_size=ranks) if ranks < env.world_size else env
            loader, _ = inference.loader(inputs, batch, size, me, DataErrors())
            for logp, y, index in predictor.batches(loader):
                idx = index.tolist()
                rows(logp, y.tolist(), [keys_of[i] for i in idx], idx, predictor.classes, 3, False)
        dist.barrier()
        return n / (time.perf_counter() - start)

    rates: dict[int, list[float]] = {r: [] for r in VARIANTS}
    for r in VARIANTS:
        one_pass(r)  # warm-up
    for i in range(repeats):
        for r in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            rates[r].append(one_pass(r))
    return {
        "data": name, "samples": n, "batch": batch, "order": "ABBA",
        **{f"ranks_{r}_samples_per_s": summarize(rates[r]) for r in VARIANTS},
        "speedup": summarize([b / a for a, b in zip(rates[1], rates[2], strict=True)]),
    }  # fmt: skip


def worker(out: str, plan: dict[str, list[str]], repeats: int) -> None:
    env = parallel.detect()
    with dist.process_group(env, config.load(None).dist):
        table = [measure(name, int(batch), keys, repeats)
                 for name, (batch, *keys) in plan.items()]  # fmt: skip
    if env.is_main:
        Path(out).write_text(json.dumps(table))


def run(quick: bool, repeats: int, out: Path) -> dict:
    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        plan = write_data(Path(tmp), quick)
        args = [f"--plan={json.dumps(plan)}", f"--repeats={repeats}"]
        results["rows"] = torchrun_job("benchmarks.predict_throughput", 2, args,
                                       timeout=900, OMP_NUM_THREADS="1")  # fmt: skip
    for r in results["rows"]:
        one, two = spread(r["ranks_1_samples_per_s"]), spread(r["ranks_2_samples_per_s"])
        print(f"{r['data']}: 1 rank {one}/s, 2 ranks {two}/s, x{spread(r['speedup'], '.2f')}")
    return save(out, "predict_throughput", results, markdown)


def markdown(results: dict) -> str:
    lines = [
        "# Prediction samples/s on 1 and 2 ranks",
        "",
        f"{describe(results['machine'])}{' (quick run)' if results['quick'] else ''} "
        f"{results['repeats']} passes of each (1 2 2 1 …) after a warm-up; median (min – max). "
        "The same 2 processes: rank 0 alone, or both ranks each with its parts; a pass ends "
        "when the slower rank is done. One reader and one intra-op thread per rank.",
        "",
        "| data | samples | batch | 1 rank samples/s | 2 ranks samples/s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['data']} | {r['samples']} | {r['batch']} | {spread(r['ranks_1_samples_per_s'])} "
            f"| {spread(r['ranks_2_samples_per_s'])} | {spread(r['speedup'], '.2f')}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    main_with_plan("benchmarks.predict_throughput", __doc__, "a CI-sized run (48 JPEGs)", worker,
                   run, argv)  # fmt: skip


if __name__ == "__main__":
    main()
