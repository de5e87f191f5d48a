"""Write scikit-learn's bundled handwritten digits as an ImageFolder of 32×32 RGB PNGs.

    python -m distnn.data.digits OUT [--val-fraction 0.2] [--seed 0]

A real dataset (1,797 scanned digits) that needs no download: the demo and tests train on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from distnn import fsio
from distnn.errors import cli


def write(out: Path, val_fraction: float = 0.2, seed: int = 0, size: int = 32) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # 8×8, values 0..16
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = round(len(images) * val_fraction)
    counts = {"train": 0, "val": 0}
    with fsio.reporting(out):  # PIL removes the file it was writing when that fails
        for rank, i in enumerate(order):
            split = "val" if rank < n_val else "train"
            target = out / split / str(digits.target[i])
            target.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC)
            img.convert("RGB").save(target / f"{i:04d}.png")
            counts[split] += 1
    return counts


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distnn.data.digits", description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = write(args.out, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
