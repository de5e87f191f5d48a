"""Sample order as a pure function of (seed, epoch, world size, rank): nothing to save but the
epoch and the number of batches consumed, and the same global batches at any world size.

Shards (ShardOrder) add the reader slot to the function: (seed, epoch, world, rank, workers).
- Train, epoch e: permute the shard list with (seed, e) and each shard's samples with
  (seed, e, shard); concatenate them into one stream. Rank r reads the stream's r-th run of
  `steps × batch_size` samples; the rest (< batch × world × accum samples, a different tail
  each epoch) is left out. So every rank runs exactly `steps` batches however many shards
  there are: with fewer shards than ranks × workers, a shard is read by two readers, each
  taking its own members.
- Inside a rank, batch t belongs to reader slot t mod W (W = data.workers: the DataLoader deals
  batches to workers in turn); each slot reads its own contiguous part of the rank's run, so
  a worker reads few shards, one after another. Which worker reads a batch never changes what
  the batch holds.
- Eval: rank r takes the r-th contiguous 1/world of the samples in manifest order, its slots
  contiguous parts of that: each sample once, nothing padded, each rank reading its own shards
  (cheaper than sample i → rank i mod world, which would make every rank read every shard).
- Resuming at batch k skips by arithmetic: no shard before it is opened.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

Key = tuple[int, int]  # (sample index, epoch): the epoch seeds the sample's augmentation
Spec = tuple[int, np.ndarray]  # (epoch, k × 3 int64 rows: shard, member, global index)


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


class ShardOrder(Sampler[Spec]):
    """Yields this rank's batches of an epoch as Specs; `steps` and `set_epoch` as TrainBatches."""

    def __init__(
        self, counts: list[int], batch_size: int, world_size: int, rank: int, workers: int,
        seed: int, accum_steps: int = 1, train: bool = True,
    ) -> None:  # fmt: skip
        self.counts = np.asarray(counts, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)])  # global index of member 0
        self.n = int(self.first[-1])
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        # SeedSequence wants a non-negative key; train.seed may be any int.
        self.slots, self.seed, self.train = max(1, workers), seed % (1 << 63), train
        if train:
            self.steps = train_steps(self.n, batch_size, world_size, accum_steps)
        else:
            self.steps = len(self._ranges(*self._span()))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch `epoch` from its batch `start_batch` on (resume)."""
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.steps - self.start

    def _span(self) -> tuple[int, int]:
        """This rank's [lo, hi) in the epoch's stream."""
        if self.train:
            per_rank = self.steps * self.batch_size
            return self.rank * per_rank, (self.rank + 1) * per_rank
        return self.n * self.rank // self.world_size, self.n * (self.rank + 1) // self.world_size

    def _ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Batch t's [start, end) within this rank's run, in the order batches are yielded."""
        b, w = self.batch_size, self.slots
        if self.train:
            per_slot = [len(range(s, self.steps, w)) for s in range(w)]
            base = np.concatenate([[0], np.cumsum(per_slot)])
            return [
                ((base[t % w] + t // w) * b, (base[t % w] + t // w + 1) * b)
                for t in range(self.steps)
            ]
        size = hi - lo
        slots = [(size * s // w, size * (s + 1) // w) for s in range(w)]
        chunks = [[(i, min(i + b, end)) for i in range(start, end, b)] for start, end in slots]
        longest = max(len(c) for c in chunks)
        return [c[j] for j in range(longest) for c in chunks if j < len(c)]

    def _stream(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        """(shard, member) pairs of stream positions [lo, hi), opening no shard outside it."""
        shards = np.arange(len(self.counts))
        if self.train:
            shards = np.random.default_rng([self.seed, epoch]).permutation(shards)
        parts, pos = [], 0
        for s in shards.tolist():
            count = int(self.counts[s])
            a, b = max(lo - pos, 0), min(hi - pos, count)
            pos += count
            if a >= b:
                continue
            members = np.arange(count)
            if self.train:
                members = np.random.default_rng([self.seed, epoch, s]).permutation(count)
            parts.append(np.stack([np.full(b - a, s), members[a:b]], axis=1))
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)

    def __iter__(self) -> Iterator[Spec]:
        lo, hi = self._span()
        run = self._stream(self.epoch, lo, hi)
        index = self.first[run[:, 0]] + run[:, 1]
        items = np.concatenate([run, index[:, None]], axis=1).astype(np.int64)
        for start, end in self._ranges(lo, hi)[self.start :]:
            yield self.epoch, items[start:end]
