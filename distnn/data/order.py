"""Sample order as a pure function of (seed, epoch, global batch): nothing to save but the epoch
and the number of batches consumed, and the same global batches at any world size and any
number of DataLoader workers — for every source, shards included.

Train, every source: epoch e's samples form one stream, seeded by (seed, e); global batch t is
the stream's t-th run of `batch_size × world` samples and rank r takes every world-th of them
(positions r, r + world, …). So the union of all ranks' batch t is batch t of one process with
world × the batch, and a run resumes exactly on another number of processes when the global
batch (`batch_size × world`) and accum_steps are kept. An epoch is `steps` batches on every rank
(`train_steps`); the rest of the stream, less than one optimizer step's samples, is left out.
- In memory and import paths (TrainBatches): the stream is a permutation of the sample indices.
- Shards (ShardOrder): the shard list permuted with (seed, e), each shard's members permuted with
  (seed, e, shard), concatenated. A global batch is a run of the stream, one or two shards
  where a shard holds more than a global batch, so a batch's reader opens one or two shards (it
  reads members by offset: see pipeline.py) and a node's readers work on the same shard at a
  time; every rank reads its share of every shard. The DataLoader deals a rank's batches to its
  workers in turn: which process or worker reads a batch never changes what the batch holds.
- Eval: every sample once, nothing padded. In memory, sample i goes to rank i mod world. Shards:
  rank r takes the r-th contiguous 1/world of the samples in manifest order and its reader
  slots (data.workers) contiguous parts of that, each rank reading its own shards; the order
  of evaluation changes with the world size and workers, what is counted does not.
- Resuming at batch k skips by arithmetic: no shard before it is opened.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

# What every order yields, one batch: (epoch, int64 sample indices); the epoch seeds the
# samples' augmentation.
Spec = tuple[int, np.ndarray]


def train_steps(n: int, batch_size: int, world_size: int, accum_steps: int = 1) -> int:
    """Micro-batches per epoch, equal on every rank and a whole number of optimizer steps
    (the remainder is dropped; the next epoch's permutation covers it)."""
    return n // (batch_size * world_size * accum_steps) * accum_steps


class TrainBatches(Sampler[Spec]):
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

    def __iter__(self) -> Iterator[Spec]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        mine = torch.randperm(self.n, generator=g)[self.rank :: self.world_size].numpy()
        for b in range(self.start, self.steps):
            yield self.epoch, mine[b * self.batch_size : (b + 1) * self.batch_size]


class EvalBatches(Sampler[Spec]):
    """Sample i goes to rank i mod world: every sample is seen once, nothing is padded."""

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int) -> None:
        self.mine = np.arange(rank, n, world_size, dtype=np.int64)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.mine) // self.batch_size)

    def __iter__(self) -> Iterator[Spec]:
        for b in range(0, len(self.mine), self.batch_size):
            yield 0, self.mine[b : b + self.batch_size]


class ShardOrder(Sampler[Spec]):
    """Yields this rank's batches of an epoch as Specs; `steps` and `set_epoch` as TrainBatches.
    `workers` (reader slots) shapes the eval order only."""

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
            self.steps = len(self._eval_ranges())
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch `epoch` from its batch `start_batch` on (resume)."""
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[Spec]:
        if not self.train:
            lo, hi = self._eval_span()
            indices = self._indices(range(len(self.counts)), lo, hi)
            for start, end in self._eval_ranges()[self.start :]:
                yield self.epoch, indices[start - lo : end - lo]
            return
        # This rank's stream positions: every world-th one from lo (≡ rank) up to hi.
        per_batch = self.batch_size * self.world_size
        lo, hi = self.start * per_batch + self.rank, self.steps * per_batch
        pending = np.zeros(0, dtype=np.int64)
        for indices in self._chunks(self._shards().tolist(), lo, hi, self.world_size, self.epoch):
            pending = np.concatenate([pending, indices])
            full = len(pending) // self.batch_size * self.batch_size
            for b in range(0, full, self.batch_size):
                yield self.epoch, pending[b : b + self.batch_size]
            pending = pending[full:]

    def _shards(self) -> np.ndarray:
        """The epoch's shards in stream order."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.counts))

    def schedule(self, ranks: Sequence[int] = (0,)) -> list[np.ndarray]:
        """The shards that `ranks` (a node's) read in each training batch of the epoch, from
        batch `start` on, in order: what a remote cache fetches ahead and evicts by. A global
        batch is a run of the stream, every rank reading a share of each of its shards: these
        are the shards that run crosses, whichever the ranks."""
        per_batch = self.batch_size * self.world_size
        shards = self._shards()
        ends = np.cumsum(self.counts[shards])  # stream position after each shard
        batches = np.arange(self.start, self.steps)
        first = np.searchsorted(ends, batches * per_batch, side="right")
        last = np.searchsorted(ends, (batches + 1) * per_batch - 1, side="right")
        return [shards[a : b + 1] for a, b in zip(first.tolist(), last.tolist(), strict=True)]

    def _chunks(
        self, shards: Iterable[int], lo: int, hi: int, step: int = 1, epoch: int | None = None
    ) -> Iterator[np.ndarray]:
        """Sample indices at stream positions lo, lo + step, … below hi, one array per shard, in
        stream order; members permuted with (seed, epoch, shard) when an
        epoch is given. Shards before lo cost a subtraction, none after hi is visited."""
        pos = 0
        for s in shards:
            count = int(self.counts[s])
            first = max(pos, lo)
            a, b = first + (lo - first) % step - pos, min(pos + count, hi) - pos
            if a < b:
                m = np.arange(a, b, step)
                if epoch is not None:
                    m = np.random.default_rng([self.seed, epoch, s]).permutation(count)[m]
                yield self.first[s] + m
            pos += count
            if pos >= hi:
                return

    def _indices(self, shards: Iterable[int], lo: int, hi: int) -> np.ndarray:
        chunks = list(self._chunks(shards, lo, hi))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)

    def _eval_span(self) -> tuple[int, int]:
        """This rank's [lo, hi) of the eval samples in manifest order."""
        return self.n * self.rank // self.world_size, self.n * (self.rank + 1) // self.world_size

    def _eval_ranges(self) -> list[tuple[int, int]]:
        """Eval batches' [start, end) positions, in the order they are yielded: each reader slot
        a contiguous part of the rank's span, the slots' batches dealt in turn."""
        lo, hi = self._eval_span()
        b, w, size = self.batch_size, self.slots, hi - lo
        slots = [(lo + size * s // w, lo + size * (s + 1) // w) for s in range(w)]
        chunks = [[(i, min(i + b, end)) for i in range(start, end, b)] for start, end in slots]
        longest = max(len(c) for c in chunks)
        return [c[j] for j in range(longest) for c in chunks if j < len(c)]


def part_size(n: int, batch_size: int) -> int:
    """Samples per prediction part, from n and the batch alone (a part is the same samples at
    any world size): about n / 1024 for large splits (up to 4096), else a batch, but no more
    than n / 64, so that a small split still makes 64 parts for up to 64 ranks."""
    return min(4096, max(-(-n // 1024), min(batch_size, n // 64), 1))


class Parts(Sampler[Spec]):
    """Prediction's order: the samples in index order cut into parts of `size`, part p to rank
    p mod world, each part in batches of consecutive indices (a shard's members are read in
    turn). Every sample once, nothing padded, and a part is the
    same samples at any world size: a rerun skips the parts in `done` whoever wrote them."""

    def __init__(self, n: int, batch_size: int, size: int, world_size: int, rank: int,
                 done: frozenset[int] = frozenset()) -> None:  # fmt: skip
        self.n, self.batch_size, self.size = n, batch_size, size
        self.count = -(-n // size)
        self.mine = [p for p in range(rank, self.count, world_size) if p not in done]

    def samples(self, p: int) -> int:
        """Samples in part p (the last part may be short)."""
        return min(self.n, (p + 1) * self.size) - p * self.size

    def sizes(self) -> list[int]:
        """Samples in each of this rank's parts."""
        return [self.samples(p) for p in self.mine]

    def __len__(self) -> int:
        return sum(-(-s // self.batch_size) for s in self.sizes())

    def __iter__(self) -> Iterator[Spec]:
        for p in self.mine:
            end = min(self.n, (p + 1) * self.size)
            for b in range(p * self.size, end, self.batch_size):
                yield 0, np.arange(b, min(b + self.batch_size, end), dtype=np.int64)


Order = TrainBatches | EvalBatches | ShardOrder
