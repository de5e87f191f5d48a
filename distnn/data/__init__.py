"""`build(cfg, env)`: the train and eval loaders every strategy and launcher shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from distnn.config import Config
from distnn.data import pipeline, sources
from distnn.data.order import EvalBatches, Key, ShardOrder, TrainBatches
from distnn.data.pipeline import DataErrors, ShardLoader
from distnn.data.transforms import EvalTransform, TrainTransform
from distnn.errors import UserError
from distnn.parallel.env import Env


class BatchReader(torch.utils.data.Dataset):
    """Reads and collates a whole batch inside the worker: one IPC message per batch, not
    per sample, and the result is already one uint8 tensor."""

    def __init__(
        self, split: sources.Split, size: int, transform: TrainTransform | EvalTransform
    ) -> None:
        self.split, self.size, self.transform = split, size, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, keys: list[Key]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.empty(len(keys), 3, self.size, self.size, dtype=torch.uint8)
        labels = torch.empty(len(keys), dtype=torch.int64)
        for j, (i, epoch) in enumerate(keys):
            images[j] = self.transform(self.split.image(i), i, epoch)
            labels[j] = self.split.label(i)
        return images, labels


@dataclass
class Loaders:
    train: DataLoader | ShardLoader
    val: DataLoader | ShardLoader
    train_order: TrainBatches | ShardOrder
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_size: int
    val_size: int
    # Unreadable samples skipped so far on this rank (data.on_error=skip; shards only).
    errors: DataErrors = field(default_factory=DataErrors)

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch on every rank."""
        return self.train_order.steps


def _loader(reader: BatchReader, order, cfg: Config, pin: bool) -> DataLoader:
    workers = cfg.data.workers
    return DataLoader(
        reader,
        sampler=order,
        batch_size=None,  # the sampler yields whole batches; BatchReader collates them
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        # Its own generator: a new iterator draws a worker seed, and drawing it from the global
        # RNG would shift dropout masks after a resume. Augmentation is seeded per sample.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def build(cfg: Config, env: Env, pin_memory: bool = False) -> Loaders:
    if cfg.data.source == "shards":
        return pipeline.build(cfg, env, pin_memory)
    ds = sources.load(cfg.data)
    size = cfg.data.image_size
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
    train_reader = BatchReader(ds.train, size, TrainTransform(size, cfg.train.seed, cfg.data.hflip))
    val_reader = BatchReader(ds.val, size, EvalTransform(size))
    val_order = EvalBatches(len(ds.val), cfg.train.batch_size, env.world_size, env.rank)
    return Loaders(
        train=_loader(train_reader, order, cfg, pin_memory),
        val=_loader(val_reader, val_order, cfg, pin_memory),
        train_order=order,
        classes=ds.classes,
        mean=ds.mean,
        std=ds.std,
        train_size=len(ds.train),
        val_size=len(ds.val),
    )
