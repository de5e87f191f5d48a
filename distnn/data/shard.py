"""Convert a dataset into webdataset tar shards plus OUT/manifest.json.

    python -m distnn.data.shard cifar10|cifar100|imagefolder|pkg.module:callable SRC OUT
        [--max-count N] [--max-size BYTES] [--seed S] [--workers W] [--resize SHORT_SIDE]
        [--quality Q] [--strict] [--kwarg KEY=VALUE ...] [--num-classes K]

Each split becomes OUT/<split>-000000.tar, ... with per sample `<key>.<ext>` (the image),
`<key>.cls` (class index) and `<key>.json` (source path or index), plus a sidecar
`<split>-000000.idx.json` with each image's byte offset (the loader's fast path). Samples are
shuffled with --seed before writing, so every shard mixes classes. JPEG/PNG/WebP files are
copied byte for byte unless --resize; CIFAR images are stored as PNG (lossless).

A user's dataset, pkg.module:callable(split="train"|"val", root=SRC, **--kwarg's), as
`data.source=` takes it, is stored as PNG; class names: its `classes`, else --num-classes.

Workers encode; this process writes the tars in order, so --max-size is exact. Each shard is
written under a temporary name and renamed when complete, then recorded in
OUT/.manifest.partial.json: a re-run reuses every recorded shard whose sha256 still matches
and continues after it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distnn import storage
from distnn.config import DataConfig
from distnn.data import manifest as mf
from distnn.data import shard_custom
from distnn.data.sources import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_PIXELS,
    cifar_dir,
    load_cifar,
    open_image,
)
from distnn.data.writer import SplitWriter, reusable, update_totals
from distnn.errors import UserError, cli, reason

KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats stored as they are
KINDS = ("cifar10", "cifar100", "imagefolder")
PARTIAL = ".manifest.partial.json"


@dataclass(frozen=True)
class Item:
    source: str  # what <key>.json records: path relative to SRC, or "<dataset>/<split>"
    label: int | None  # None: a user dataset's, known once the sample is read
    path: str | None = None  # imagefolder: the file
    index: int | None = None  # cifar, user dataset: the sample's index in its split
    pixels: bytes | None = None  # cifar: 3 × 32 × 32 uint8
    split: str | None = None  # user dataset: the split the worker reads sample `index` of

    @property
    def name(self) -> str:
        return self.source if self.split is None else f"{self.source}[{self.index}]"


@dataclass(frozen=True)
class Options:
    resize: int | None
    quality: int


def collect_cifar(name: str, src: Path) -> tuple[list[str], dict[str, list[Item]]]:
    if not (cifar_dir(name, src) / ("batches.meta" if name == "cifar10" else "meta")).is_file():
        raise UserError(f"no {name} python-format data in {str(src)!r}")
    ds = load_cifar(name, DataConfig(source=name, root=str(src)))
    splits = {}
    for split, data in (("train", ds.train), ("test", ds.val)):
        images, labels = data.images.numpy(), data.labels.tolist()
        splits[split] = [
            Item(f"{name}/{split}", labels[i], index=i, pixels=images[i].tobytes())
            for i in range(len(labels))
        ]
    return ds.classes, splits


def collect_imagefolder(src: Path) -> tuple[list[str], dict[str, list[Item]], list[dict]]:
    for split in ("train", "val"):
        if not (src / split).is_dir():
            raise UserError(f"{str(src)!r} has no {split}/ directory (expected {split}/<class>/*)")
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{str(src / 'train')!r} has no class directories")
    unknown = sorted({p.name for p in (src / "val").iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise UserError(f"val classes {unknown} are not among the train classes in {str(src)!r}")
    splits: dict[str, list[Item]] = {}
    skipped = []
    for split in ("train", "val"):
        items = splits[split] = []
        for label, name in enumerate(classes):
            class_dir = src / split / name
            if not class_dir.is_dir():
                continue  # a class may be absent from val
            files = sorted(p for p in class_dir.rglob("*") if p.is_file())
            for p in files:
                rel = str(p.relative_to(src))
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append(Item(rel, label, path=str(p)))
                elif not p.name.startswith("."):  # .DS_Store and friends are not data
                    skipped.append({"split": split, "source": rel, "reason": "not an image file"})
            if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
                raise UserError(
                    f"class directory {str(class_dir)!r} holds no images "
                    f"({' '.join(IMAGE_EXTENSIONS)})"
                )
    return classes, splits, skipped


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def encode(item: Item, opts: Options) -> tuple[str, bytes]:
    """(extension, bytes) to store for one sample; raises for an unreadable image."""
    if item.pixels is not None:
        rgb = np.frombuffer(item.pixels, np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
        return "png", _png(Image.fromarray(np.ascontiguousarray(rgb)))
    data = Path(item.path).read_bytes()
    with open_image(data, MAX_PIXELS) as img:  # a bomb is skipped before it decodes
        fmt, (w, h) = img.format, img.size
        small = opts.resize is None or min(w, h) <= opts.resize
        if fmt == "JPEG":
            # DCT scaling: decoding at up to 1/8 size still reads every entropy-coded byte,
            # so truncation shows, at a fraction of the cost of a full decode.
            side = opts.resize or 1
            img.draft("RGB", (1, 1) if small else (w * side // min(w, h), h * side // min(w, h)))
        img.load()  # proves the file decodes: a broken one is skipped here, not in training
        if small and fmt in KEEP:
            return KEEP[fmt], data  # byte for byte
        rgb = img.convert("RGB")
        if not small:
            scale = opts.resize / min(w, h)
            rgb = rgb.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    if fmt == "JPEG":
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=opts.quality)
        return "jpg", out.getvalue()
    return "png", _png(rgb)  # lossless sources stay lossless


_OPTS: Options | None = None


def _init(opts: Options, source: shard_custom.Source | None = None) -> None:
    global _OPTS
    _OPTS = opts
    if source is not None:  # a worker opens the user's datasets itself
        shard_custom.open_splits(source)


def _encode_job(item: Item) -> tuple[str, bytes, int] | str:
    """(extension, bytes, label) of one sample, or why it cannot be read."""
    try:
        if item.split is not None:
            img, label = shard_custom.read(item.split, item.index, _OPTS.resize)
            return "png", _png(img), label
        return (*encode(item, _OPTS), item.label)
    except shard_custom.WorkerError:
        raise  # stops the run
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return reason(e)


def parse_size(text: str) -> int:
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    t = text.strip().lower().removesuffix("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except ValueError:
        raise UserError(f"--max-size {text!r} is not a size (e.g. 268435456, 256M, 1G)") from None


def fingerprint(options: dict, classes: list[str], splits: dict[str, list[Item]]) -> str:
    """What the shards are a function of: a re-run may reuse shards only when it matches."""
    h = hashlib.sha256(json.dumps([options, classes]).encode())
    for split, items in splits.items():
        h.update(json.dumps([split, [(i.source, i.index, i.label) for i in items]]).encode())
    return h.hexdigest()


def _previous(out: Path, print_: str) -> dict:
    """The finished (manifest.json) or interrupted (.manifest.partial.json) run's record."""
    for name in (mf.NAME, PARTIAL):
        if (out / name).is_file():
            previous = json.loads((out / name).read_text())
            if previous.get("created", {}).get("fingerprint") != print_:
                raise UserError(
                    f"{str(out)!r} holds shards of another source or other options; "
                    "delete it or choose another OUT"
                )
            return previous
    return {}


def _progress(split: str, done: int, total: int, rate: float) -> None:
    bar = "#" * (30 * done // total)
    print(f"\r{split} [{bar:<30}] {done}/{total} {rate:.0f}/s", end="", file=sys.stderr)


def _write_split(w: SplitWriter, split: str, items: list[Item], start: int, results,
                 doc: dict, out: Path, strict: bool) -> int:  # fmt: skip
    """Write items[start:] (their encodings in `results`); the number of shards written."""
    written, tty, t0, shown = 0, sys.stderr.isatty(), time.perf_counter(), 0.0
    for pos, (item, result) in enumerate(zip(items[start:], results, strict=True), start):
        if isinstance(result, str):
            if strict:
                raise UserError(f"cannot read image {item.name!r}: {result} (--strict)")
            where = {"source": item.source} | ({} if item.split is None else {"index": item.index})
            doc["skipped"].append({"split": split, "position": pos, **where, "reason": result})
            print(f"warning: skipped {item.name}: {result}", file=sys.stderr)
            continue
        ext, data, label = result
        meta = {"source": item.source, "label": label}
        if item.index is not None:
            meta["index"] = item.index
        if w.add(f"{split}-{pos:08d}", ext, data, label, json.dumps(meta).encode(), pos):
            written += 1
            update_totals(doc, split, w.shards)
            mf.write_json(out / PARTIAL, doc)  # the journal a re-run resumes from
        if tty and time.perf_counter() - shown > 0.2:
            shown = time.perf_counter()
            _progress(split, pos + 1, len(items), (pos + 1 - start) / (shown - t0))
    if tty:
        print(file=sys.stderr)
    return written + (w.close(len(items)) is not None)


def shard(kind: str, src: Path | str, out: Path, max_count: int = 5000,
          max_size: int = 256_000_000, seed: int = 0, workers: int = 1, resize: int | None = None,
          quality: int = 90, strict: bool = False, command: str = "", *,
          kwargs: dict | None = None, num_classes: int | None = None) -> dict:  # fmt: skip
    """Write SRC's splits as shards under OUT; the manifest written. A `pkg.module:callable`
    kind is called with root=SRC (any string) and **kwargs; the others read directory SRC."""
    if max_count < 1 or max_size < 64 * 1024 or workers < 1 or not 1 <= quality <= 100:
        raise UserError("need --max-count >= 1, --max-size >= 64K, --workers >= 1, --quality 1-100")
    user = shard_custom.check(kind, KINDS, kwargs, num_classes)
    if not user and not Path(src).is_dir():
        raise UserError(f"source {str(src)!r} is not a directory")
    skipped: list[dict] = []
    source = None
    if user:
        source, classes, lengths, mean, std = shard_custom.collect(
            kind, str(src), kwargs, num_classes
        )
        splits = {s: [Item(f"{kind}/{s}", None, index=i, split=s) for i in range(n)]
                  for s, n in lengths.items()}  # fmt: skip
        dataset = kind
    elif kind == "imagefolder":
        src = Path(src)
        classes, splits, skipped = collect_imagefolder(src)
        dataset, mean, std = src.name, IMAGENET_MEAN, IMAGENET_STD
    else:
        classes, splits = collect_cifar(kind, Path(src))
        dataset, mean, std = kind, CIFAR_MEAN, CIFAR_STD
    if strict and skipped:
        raise UserError(f"{skipped[0]['source']}: {skipped[0]['reason']} (--strict)")
    for split, items in splits.items():
        random.Random(f"{seed}:{split}").shuffle(items)  # so every shard mixes classes
    options = {"kind": kind, "seed": seed, "max_count": max_count, "max_size": max_size,
               "resize": resize, "quality": quality if resize else None}  # fmt: skip
    if user:  # what the callable's samples are a function of, besides its name
        options |= {"root": str(src), "kwargs": kwargs or {}}
    print_ = fingerprint(options, classes, splits)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tar*.tmp"):
        stale.unlink()  # a crashed run's unfinished shard
    previous = _previous(out, print_)
    doc = {
        "format": mf.FORMAT, "version": mf.VERSION, "dataset": dataset, "classes": classes,
        "mean": list(mean), "std": list(std), "splits": {},
        "image_encoding": {"formats": {}, "resize": resize, "quality": options["quality"]},
        "totals": {}, "skipped": list(skipped),
        "created": {"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "options": options, "fingerprint": print_},
    }  # fmt: skip
    opts = Options(resize, quality)
    _init(opts)
    pool = multiprocessing.Pool(workers, _init, (opts, source)) if workers > 1 else None
    reused = written = 0
    w = None
    try:
        for split, items in splits.items():
            done = reusable(out, previous.get("splits", {}).get(split, {}).get("shards", []))
            reused += len(done)
            start = done[-1]["source_range"][1] if done else 0
            doc["skipped"] += [
                s for s in previous.get("skipped", [])
                if s.get("split") == split and s.get("position", start) < start
            ]  # fmt: skip
            todo = items[start:]
            results = pool.imap(_encode_job, todo, 16) if pool else map(_encode_job, todo)
            w = SplitWriter(out, split, max_count, max_size, done)
            written += _write_split(w, split, items, start, results, doc, out, strict)
            if not w.shards:
                raise UserError(f"split {split!r} of {str(src)!r} has no readable image")
            update_totals(doc, split, w.shards)
            mf.write_json(out / PARTIAL, doc)
    finally:
        if w is not None:
            w.abort()  # only an error leaves a shard open
        if pool:
            pool.terminate()
        shard_custom.close()
    mf.write_json(out / mf.NAME, doc)
    (out / PARTIAL).unlink(missing_ok=True)
    summary = ", ".join(f"{s} {v['count']}" for s, v in doc["splits"].items())
    print(f"{out}: {summary} samples; {written} shards written, {reused} reused (verified), "
          f"{len(doc['skipped'])} skipped")  # fmt: skip
    return doc


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distnn.data.shard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("kind", help=f"{' | '.join(KINDS)} | pkg.module:callable")
    p.add_argument("src", help="the dataset directory; a callable's root= (any string)")
    p.add_argument("out", help="output directory, or a URL (s3://bucket/prefix, ...) to upload to")
    p.add_argument(
        "--staging",
        type=Path,
        help="a URL out's local copy, kept for re-runs (default: in the node's cache)",
    )
    p.add_argument("--max-count", type=int, default=5000, help="samples per shard at most")
    p.add_argument("--max-size", default="256M", help="bytes per shard at most (256M, 1G, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--resize", type=int, metavar="SHORT_SIDE", help="downscale larger images")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality after --resize")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of the callable (YAML value); repeatable")  # fmt: skip
    p.add_argument("--num-classes", type=int, metavar="K",
                   help="a callable's dataset without `classes`: classes named 0..K-1")  # fmt: skip
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "distnn.data.shard", *(argv or sys.argv[1:])])
    remote = storage.is_remote(args.out)
    out = storage.local_path(args.out)
    if remote:  # written here first, then uploaded
        key = hashlib.sha256(args.out.encode()).hexdigest()[:16]
        out = args.staging or storage.default_cache_dir() / "staging" / key
    shard(args.kind, args.src, out, args.max_count,
          parse_size(args.max_size), args.seed, args.workers, args.resize, args.quality,
          args.strict, command, kwargs=shard_custom.parse_kwargs(args.kwarg),
          num_classes=args.num_classes)  # fmt: skip
    if remote:
        # The AWS environment and files say how (as for training); data.retry_s's default.
        put = storage.upload(out, args.out, {}, DataConfig.retry_s)
        print(f"{args.out}: {put} files uploaded from {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
