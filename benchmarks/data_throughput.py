"""Data loading throughput: distnn shards vs torchvision ImageFolder vs a bare decode loop.

    python -m benchmarks.data_throughput [--quick] [--repeats 5] [--out benchmarks/results]

Generates its own images (32 px PNG, CIFAR-like; and ImageNet-like JPEG, 350-500 px at
quality 90), shards them with `python -m distnn.data.shard`, then measures training samples/s
with 1 and 2 worker processes for:
- shards: distnn's shard loader (indexed read, PIL decode, seeded train augmentation,
  batches collated in the workers) — what training uses;
- shards, streamed: the same with the sidecar index removed, as another tool's shards come (each
  worker scans the tars' headers once and reads members by offset);
- ImageFolder: torchvision's ImageFolder + DataLoader with the same transforms (PIL decode,
  then pad-4 random crop + flip, or random-resized crop + flip, on uint8 tensors);
- bare decode+augment: a loop over the same bytes already in memory with the same decoder and
  the same batched augmentation (TrainTransform.batch, batches of the loader's size), in 1 or
  2 processes — the limit; and bare decode alone.
Each figure is the median of --repeats timed passes after a warm-up pass (page cache warm),
with min and max. Writes results/data_throughput.json (with machine info) and .md.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import describe, machine, parser, save, timed

KINDS = {
    # name: (extension, image size the model trains at, batch size, images full / quick)
    "32px PNG": ("png", 32, 64, 4096, 1024),
    "ImageNet-like JPEG": ("jpg", 224, 32, 384, 96),
}


def make_images(root: Path, ext: str, n: int, seed: int = 0) -> None:
    """train/<class>/*.ext and a small val/: smooth colour fields plus noise, so PNG and JPEG
    compress about as real photos do (32 px: ~2.5 KB PNGs; JPEG: ~60-120 KB)."""
    rng = np.random.default_rng(seed)
    for i in range(n + 10):
        split = "train" if i < n else "val"
        if ext == "png":
            h = w = 32
        else:
            h, w = int(rng.integers(350, 501)), int(rng.integers(350, 501))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        mean, grad = rng.uniform(0, 255, (3, 1, 1)), rng.uniform(-120, 120, (3, 2, 1, 1))
        base = mean + grad[:, 0] * yy + grad[:, 1] * xx  # 3 × h × w
        noise = rng.normal(0, 12, (h, w, 3))
        pixels = (base.transpose(1, 2, 0) + noise).clip(0, 255).astype(np.uint8)
        d = root / split / f"class_{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(pixels)
        img.save(d / f"{i:06d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))


def shard_loader(
    root: Path | str, size: int, batch: int, workers: int, *extra: str
) -> Callable[[], int]:
    from distnn import config, data
    from distnn.parallel.env import Env

    cfg = config.load(None, ["data.source=shards", f"data.root={root}", f"data.image_size={size}",
                             f"data.workers={workers}", f"train.batch_size={batch}",
                             *extra])  # fmt: skip
    loaders = data.build(cfg, Env())
    epoch = iter(range(1_000_000))

    def run() -> int:
        loaders.train_order.set_epoch(next(epoch))
        return sum(len(y) for _, y in loaders.train)

    return run


def imagefolder_loader(root: Path, size: int, batch: int, workers: int) -> Callable[[], int]:
    from torchvision import datasets
    from torchvision.transforms import v2

    crop = (
        [v2.RandomCrop(size, padding=4)]
        if size <= 64
        else [v2.RandomResizedCrop(size, antialias=True)]
    )
    transform = v2.Compose([v2.PILToTensor(), *crop, v2.RandomHorizontalFlip()])
    ds = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=True, prefetch_factor=2,
    )  # fmt: skip
    return lambda: sum(len(y) for _, y in loader)


_BLOBS: list[bytes] = []


def _load_blobs(paths: list[str]) -> None:
    torch.set_num_threads(1)  # as in a DataLoader worker
    _BLOBS[:] = [Path(p).read_bytes() for p in paths]


def _bare(task: tuple[int, int, int, int, bool]) -> int:
    from distnn.data.sources import decode_rgb
    from distnn.data.transforms import TrainTransform

    lo, hi, size, batch, augment = task
    transform = TrainTransform(size, seed=0)
    for start in range(lo, hi, batch):
        indices = list(range(start, min(start + batch, hi)))
        images = [decode_rgb(_BLOBS[i]) for i in indices]
        if augment:  # the shard loader's own augmentation path: whole batches
            transform.batch(images, indices, 0)
    return hi - lo


def bare_loop(paths: list[Path], size: int, batch: int, workers: int, augment: bool):
    pool = multiprocessing.Pool(workers, _load_blobs, ([str(p) for p in paths],))
    n = len(paths)
    tasks = [(n * k // workers, n * (k + 1) // workers, size, batch, augment)
             for k in range(workers)]  # fmt: skip
    return (lambda: sum(pool.map(_bare, tasks))), pool


def report(row: dict) -> None:
    print(f"{row['data']:20} {row['pipeline']:28} workers={row['workers']}  "
          f"{row['median']:8.0f} samples/s", flush=True)  # fmt: skip


def run(quick: bool, repeats: int, out: Path) -> dict:
    from distnn.data import shard

    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (ext, size, batch, n_full, n_quick) in KINDS.items():
            src, shards = Path(tmp) / f"{ext}_src", Path(tmp) / f"{ext}_shards"
            make_images(src, ext, n_quick if quick else n_full)
            shard.shard("imagefolder", src, shards, max_count=256, workers=2)
            streamed = Path(tmp) / f"{ext}_streamed"
            streamed.mkdir()
            doc = json.loads((shards / "manifest.json").read_text())
            for split in doc["splits"].values():
                for s in split["shards"]:
                    s.pop("index")
                    (streamed / s["file"]).symlink_to(shards / s["file"])
            (streamed / "manifest.json").write_text(json.dumps(doc))
            paths = sorted((src / "train").rglob(f"*.{ext}"))
            for workers in (1, 2):
                cases = [
                    ("shards", shard_loader, shards),
                    ("shards, streamed (no index)", shard_loader, streamed),
                    ("torchvision ImageFolder", imagefolder_loader, src),
                ]
                for name, make, root in cases:
                    rates = timed(make(root, size, batch, workers), repeats)
                    row = {"data": kind, "pipeline": name, "workers": workers, **rates}
                    results["rows"].append(row)
                    report(row)
                for name, augment in (("bare decode+augment", True), ("bare decode", False)):
                    fn, pool = bare_loop(paths, size, batch, workers, augment)
                    row = {"data": kind, "pipeline": name, "workers": workers, **timed(fn, repeats)}
                    pool.terminate()
                    results["rows"].append(row)
                    report(row)
    results["ratios"] = ratios(results["rows"])
    return save(out, "data_throughput", results, markdown)


def ratios(rows: list[dict]) -> list[dict]:
    """shards ÷ ImageFolder and shards ÷ bare decode+augment, per data kind and workers."""
    med = {(r["data"], r["pipeline"], r["workers"]): r["median"] for r in rows}
    out = []
    for data, _, workers in sorted({(r["data"], 0, r["workers"]) for r in rows}):
        shards = med[(data, "shards", workers)]
        out.append({
            "data": data, "workers": workers,
            "vs_imagefolder": shards / med[(data, "torchvision ImageFolder", workers)],
            "vs_bare_decode_augment": shards / med[(data, "bare decode+augment", workers)],
        })  # fmt: skip
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Data loading throughput (samples/s, training transforms)",
        "",
        f"{describe(m)} torchvision {m['torchvision']}, webdataset {m['webdataset']}, "
        f"Pillow {m['pillow']}{' (quick run)' if results['quick'] else ''}. Median of "
        f"{results['repeats']} passes after a warm-up (min – max).",
        "",
        "| data | pipeline | workers | samples/s | min – max |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['data']} | {r['pipeline']} | {r['workers']} | {r['median']:,.0f} "
            f"| {r['min']:,.0f} – {r['max']:,.0f} |"
        )
    lines += ["", "| data | workers | shards ÷ ImageFolder | shards ÷ bare decode+augment |",
              "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for r in results["ratios"]:
        lines.append(
            f"| {r['data']} | {r['workers']} | {r['vs_imagefolder']:.2f} "
            f"| {r['vs_bare_decode_augment']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser("benchmarks.data_throughput", __doc__, "a CI-sized run (fewer images)")
    args = p.parse_args(argv)
    results = run(args.quick, args.repeats, args.out)
    print(markdown(results))


if __name__ == "__main__":
    main(sys.argv[1:])
