"""`build(cfg, env)`: the train and eval loaders every strategy and launcher shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from distnn import storage
from distnn.config import Config, for_world
from distnn.data import custom, fetch, order, pipeline, sources, transforms
from distnn.data.errors import Batch, DataErrors, Fatal, PolicyLoader, Unreadable
from distnn.data.order import Order, Spec
from distnn.data.sources import MAX_PIXELS, Split, decode_rgb
from distnn.data.streams import StreamOrder
from distnn.data.transforms import EvalTransform, TrainTransform
from distnn.errors import UserError, reason
from distnn.parallel.env import Env


class Reader(torch.utils.data.Dataset):
    """Reads, decodes, augments and collates a whole batch inside a worker (one IPC message per
    batch, not per sample, and already one uint8 N × 3 × S × S tensor), for every source: the
    one place that decodes. Unreadable samples are left out of the batch and reported, for
    `data.on_error` to decide about (errors.PolicyLoader)."""

    def __init__(
        self, split: Split, transform: TrainTransform | EvalTransform, source: str,
        max_pixels: int = MAX_PIXELS,
    ) -> None:  # fmt: skip
        self.split, self.transform, self.source = split, transform, source
        self.max_pixels = max_pixels  # data.max_pixels travels to the workers with the reader

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, spec: Spec) -> Batch:
        epoch, batch = spec
        images, labels, indices, problems = [], [], [], []
        for i in batch.tolist():
            try:
                image, label = self.split.sample(i)
                if not isinstance(image, np.ndarray):
                    image = decode_rgb(image, self.max_pixels)
            except storage.Unreachable as e:
                problems.append(Fatal(e))
                break
            except Exception as e:  # PIL alone raises OSError, SyntaxError, ValueError, zlib.error
                why = reason(e)
                problems.append(Unreadable(f"{self.split.where(i)}: {why}", i, why))
                continue
            images.append(image)
            labels.append(label)
            indices.append(i)
        x = self.transform.batch(images, indices, epoch)
        y, read = (torch.tensor(v, dtype=torch.int64) for v in (labels, indices))
        return x, y, problems, read

    def where(self, spec: Spec) -> str:
        """What a batch reads, for a line about the batch as a whole."""
        batch = spec[1].tolist()
        shown = ", ".join(dict.fromkeys(self.split.where(i) for i in batch[:4]))
        return f"data.source={self.source} ({shown}{', …' if len(batch) > 4 else ''})"


@dataclass
class Loaders:
    train: PolicyLoader
    val: PolicyLoader
    train_order: Order
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_size: int
    val_size: int
    # Unreadable samples skipped so far on this rank (data.on_error=skip), train and val; the
    # default serves loaders that read nothing from disk (the benchmarks' in-memory batches).
    errors: DataErrors = field(default_factory=DataErrors)
    # Remote shards: this node's cache, and where its ledger stood when the loaders were built.
    cache: storage.Cache | None = None
    ledger_start: int = 0

    def cache_counts(self) -> dict[str, int]:
        """Bytes this node has downloaded and cache hits since the loaders were built (remote
        shards only): what the metrics log as cache_bytes and cache_hits."""
        if self.cache is None:
            return {}
        downloaded, hits, _ = self.cache.counts(self.ledger_start)
        return {"cache_bytes": downloaded, "cache_hits": hits}

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch on every rank."""
        return self.train_order.steps


def _loader(reader: Reader, order: Sampler, cfg: Config, pin: bool, errors: DataErrors,
            train: bool, indices: bool) -> PolicyLoader:  # fmt: skip
    """The DataLoader over a reader's whole batches, under `data.on_error` and, with workers,
    `data.timeout_s` (every source); with `indices`, each batch's sample indices too."""
    workers = cfg.data.workers
    timeout = cfg.data.timeout_s if workers > 0 else 0  # torch's timeout needs workers
    loader = DataLoader(
        reader,
        sampler=order,
        batch_size=None,  # the sampler yields whole batches; the reader collates them
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        # Its own generator: a new iterator draws a worker seed, and drawing it from the global
        # RNG would shift dropout masks after a resume. Augmentation is seeded per sample.
        generator=torch.Generator().manual_seed(cfg.train.seed),
        timeout=timeout,
    )
    return PolicyLoader(loader, errors, cfg.data.on_error, train, timeout, indices)


def _order(
    split: Split, batch_size: int, world_size: int, rank: int, workers: int, seed: int,
    accum_steps: int = 1, streams: int = 1, train: bool = True,
) -> Order:  # fmt: skip
    """The order of a split's samples: by blocks (shards; in `streams` streams when more than
    one) where it has them, else by index."""
    shape = (batch_size, world_size, rank, workers, seed, accum_steps)
    if split.blocks is None:
        if train:
            return order.TrainBatches(len(split), batch_size, world_size, rank, seed, accum_steps)
        return order.EvalBatches(len(split), batch_size, world_size, rank)
    if train and streams > 1:
        return StreamOrder(split.blocks, *shape, streams)
    return order.ShardOrder(split.blocks, *shape, train)


def open_dataset(cfg: Config, env: Env, datasets: tuple[Any, Any] | None = None) -> sources.Dataset:
    """Every source as a Dataset of Splits: given in Python, shards, built-in, or an import path
    (the package, not sources.py, knows them all: sources.py stays the leaf the others import)."""
    if datasets is not None:
        return custom.from_datasets(
            *datasets, cfg.model.num_classes, custom.PYTHON, cfg.data.max_pixels
        )
    if cfg.data.source == "shards":
        return pipeline.load(cfg.data, (env.local_rank, env.local_world_size))
    if cfg.data.source in sources.SOURCES:
        return sources.load(cfg.data)
    return custom.load(cfg.data, cfg.model.num_classes)


def eval_loader(
    split: Split, source: str, cfg: Config, sampler: Sampler, errors: DataErrors,
    pin_memory: bool = False,
) -> PolicyLoader:  # fmt: skip
    """Prediction's loader over any split: the eval transform of `cfg.data`, `sampler`'s
    batches (order.Parts), yielding (uint8 images, labels, sample indices)."""
    reader = Reader(split, EvalTransform(cfg.data.image_size), source, cfg.data.max_pixels)
    return _loader(reader, sampler, cfg, pin_memory, errors, train=False, indices=True)


def build(
    cfg: Config,
    env: Env,
    pin_memory: bool = False,
    datasets: tuple[Any, Any] | None = None,
    indices: bool = False,
) -> Loaders:
    """The loaders of `cfg.data`, or of (train, val) map-style datasets given in Python; with
    `indices`, they yield (images, labels, sample indices): which samples a batch holds."""
    cfg = for_world(cfg, env.world_size, env.local_world_size)  # as train() runs it
    d, t = cfg.data, cfg.train
    ds = open_dataset(cfg, env, datasets)
    shape = (t.batch_size, env.world_size, env.rank, d.workers, t.seed)
    train_order = _order(ds.train, *shape, t.accum_steps, d.streams)
    if train_order.steps == 0:
        global_batch = t.batch_size * env.world_size * t.accum_steps
        raise UserError(
            f"{len(ds.train)} training samples of data.source={ds.name} make no full global "
            f"batch of {global_batch} (train.batch_size × world size × train.accum_steps); "
            "lower train.batch_size"
        )
    val_order = _order(ds.val, *shape, train=False)
    train, val = transforms.for_config(d, t.seed, ds.mean)
    errors = DataErrors()
    cache = getattr(ds.train, "files", None)
    cache = cache if isinstance(cache, storage.Cache) else None
    sampler: Sampler = train_order
    if cache is not None and env.local_rank == 0 and isinstance(train_order, order.ShardOrder):
        # Batches handed to workers and maybe still being read (workers × prefetch_factor),
        # and the accum_steps - 1 that other ranks may lag behind rank 0 between all-reduces.
        behind = max(d.workers, 1) * (d.prefetch_factor if d.workers else 1) + t.accum_steps
        fetcher = fetch.Fetcher(ds.train, cache, d.prefetch_shards, d.cache_limit, behind)
        node = range(env.rank - env.local_rank, env.rank - env.local_rank + env.local_world_size)
        sampler = fetch.Prefetching(train_order, fetcher, node)
    return Loaders(
        train=_loader(
            Reader(ds.train, train, ds.name, d.max_pixels),
            sampler,
            cfg,
            pin_memory,
            errors,
            train=True,
            indices=indices,
        ),
        val=_loader(
            Reader(ds.val, val, ds.name, d.max_pixels),
            val_order,
            cfg,
            pin_memory,
            errors,
            train=False,
            indices=indices,
        ),
        train_order=train_order,
        classes=ds.classes,
        mean=ds.mean,
        std=ds.std,
        train_size=len(ds.train),
        val_size=len(ds.val),
        errors=errors,
        cache=cache,
        ledger_start=cache.ledger_end() if cache is not None else 0,
    )
