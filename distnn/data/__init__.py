"""`build(cfg, env)`: the train and eval loaders every strategy and launcher shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from distnn.config import Config, for_world
from distnn.data import custom, pipeline, sources, transforms
from distnn.data.errors import Batch, DataErrors, PolicyLoader
from distnn.data.order import EvalBatches, Key, ShardOrder, TrainBatches
from distnn.data.transforms import EvalTransform, TrainTransform
from distnn.errors import UserError, reason
from distnn.parallel.env import Env


class BatchReader(torch.utils.data.Dataset):
    """Reads and collates a whole batch inside the worker: one IPC message per batch, not
    per sample, and the result is already one uint8 tensor. Unreadable samples are left out
    and reported, as ShardReader does, for `data.on_error` to decide about."""

    def __init__(
        self, split: sources.Split, transform: TrainTransform | EvalTransform, source: str
    ) -> None:
        self.split, self.transform, self.source = split, transform, source

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, keys: list[Key]) -> Batch:
        images, labels, indices, problems = [], [], [], []
        for i, _ in keys:
            try:
                image, label = self.split.sample(i)
            except Exception as e:  # a file that does not decode; a user's split may raise anything
                problems.append(f"sample {i}: {reason(e)}")
                continue
            images.append(image.permute(1, 2, 0).numpy())  # HWC, as the transforms take
            labels.append(label)
            indices.append(i)
        epoch = keys[0][1] if keys else 0  # the samplers give a batch's keys one epoch
        x = self.transform.batch(images, indices, epoch)
        return x, torch.tensor(labels, dtype=torch.int64), problems

    def where(self, keys: list[Key]) -> str:
        """What a batch reads, for a line about the batch as a whole."""
        shown = ", ".join(str(i) for i, _ in keys[:4]) + (", …" if len(keys) > 4 else "")
        return f"data.source={self.source} (samples {shown})"


@dataclass
class Loaders:
    train: PolicyLoader
    val: PolicyLoader
    train_order: TrainBatches | ShardOrder
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_size: int
    val_size: int
    # Unreadable samples skipped so far on this rank (data.on_error=skip), train and val; the
    # default serves loaders that read nothing from disk (the benchmarks' in-memory batches).
    errors: DataErrors = field(default_factory=DataErrors)

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch on every rank."""
        return self.train_order.steps


def _loader(
    reader: BatchReader | pipeline.ShardReader,
    order: TrainBatches | EvalBatches | ShardOrder,
    cfg: Config,
    pin: bool,
    errors: DataErrors,
    train: bool,
) -> PolicyLoader:
    """The DataLoader over a reader's whole batches, under `data.on_error` and, with workers,
    `data.timeout_s` (every source)."""
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
    return PolicyLoader(loader, errors, cfg.data.on_error, train, timeout)


def _dataset(cfg: Config, datasets: tuple[Any, Any] | None) -> sources.Dataset:
    if datasets is not None:
        return custom.from_datasets(
            *datasets, cfg.model.num_classes, custom.PYTHON, cfg.data.max_pixels
        )
    if cfg.data.source in sources.SOURCES:
        return sources.load(cfg.data)
    return custom.load(cfg.data, cfg.model.num_classes)


def build(
    cfg: Config, env: Env, pin_memory: bool = False, datasets: tuple[Any, Any] | None = None
) -> Loaders:
    """The loaders of `cfg.data`, or of (train, val) map-style datasets given in Python."""
    cfg = for_world(cfg, env.world_size, env.local_world_size)  # as train() runs it
    if cfg.data.source == "shards" and datasets is None:
        return pipeline.build(cfg, env, pin_memory)
    ds = _dataset(cfg, datasets)
    order = TrainBatches(
        len(ds.train),
        cfg.train.batch_size,
        env.world_size,
        env.rank,
        cfg.train.seed,
        cfg.train.accum_steps,
    )
    if order.steps == 0:
        global_batch = cfg.train.batch_size * env.world_size * cfg.train.accum_steps
        raise UserError(
            f"{len(ds.train)} training samples make no full global batch of {global_batch} "
            f"(train.batch_size × world size × train.accum_steps); lower train.batch_size"
        )
    train, val = transforms.for_config(cfg.data, cfg.train.seed, ds.mean)
    train_reader = BatchReader(ds.train, train, ds.name)
    val_reader = BatchReader(ds.val, val, ds.name)
    val_order = EvalBatches(len(ds.val), cfg.train.batch_size, env.world_size, env.rank)
    errors = DataErrors()
    return Loaders(
        train=_loader(train_reader, order, cfg, pin_memory, errors, train=True),
        val=_loader(val_reader, val_order, cfg, pin_memory, errors, train=False),
        train_order=order,
        classes=ds.classes,
        mean=ds.mean,
        std=ds.std,
        train_size=len(ds.train),
        val_size=len(ds.val),
        errors=errors,
    )
