"""Sample order as a pure function of (seed, epoch, world size, rank): nothing to save but the
epoch and the number of batches consumed, and the same global batches at any world size."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

Key = tuple[int, int]  # (sample index, epoch): the epoch seeds the sample's augmentation


def train_steps(n: int, batch_size: int, world_size: int, accum_steps: int = 1) -> int:
    """Micro-batches per epoch, equal on every rank and a whole number of optimizer steps
    (the remainder is dropped; the next epoch's permutation covers it)."""
    return n // (batch_size * world_size * accum_steps) * accum_steps


class TrainBatches(Sampler[list[Key]]):
    """Epoch e's permutation comes from (seed, e). Rank r takes every world-th sample, so the
    union of all ranks' batch t is exactly batch t of a single process with world × the batch."""

    def __init__(
        self, n: int, batch_size: int, world_size: int, rank: int, seed: int, accum_steps: int = 1
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.steps = train_steps(n, batch_size, world_size, accum_steps)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch `epoch` from its batch `start_batch` on (resume)."""
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[Key]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        mine = torch.randperm(self.n, generator=g)[self.rank :: self.world_size].tolist()
        for b in range(self.start, self.steps):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, self.epoch) for i in chunk]


class EvalBatches(Sampler[list[Key]]):
    """Sample i goes to rank i mod world: every sample is seen once, nothing is padded."""

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int) -> None:
        self.mine = list(range(rank, n, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.mine) // self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        for b in range(0, len(self.mine), self.batch_size):
            yield [(i, 0) for i in self.mine[b : b + self.batch_size]]
