"""`data.streams=C`: global batches whose shards a node can read alone, still exact.

With one stream (order.ShardOrder) a global batch is a run of the epoch's stream and every
rank reads a share of every shard: from object storage every node downloads the whole dataset
every epoch. With C streams the epoch's shards, permuted with (seed, epoch), are dealt to C
streams (each shard in turn to the stream with the fewest samples so far), each shard's
members permuted with (seed, epoch, shard) as before, and global batch t is C equal runs, run c
being positions [t·R, (t+1)·R) of stream c (R = global batch ÷ C). The global batches are a
function of (seed, epoch, global batch, C), not of the world size, so a run resumes exactly on
any number of processes that keeps the global batch.

Ranks take contiguous parts of the global batch (rank r: positions [r·b, (r+1)·b)), and
torchrun and srun number a node's ranks contiguously: with C = nodes each node's ranks read one
stream, with C a multiple of the world size each rank reads C ÷ world streams of its own. Either
way a node reads only its streams' shards, about 1/C of the dataset per epoch instead of all of
it (benchmarks/stream_plan.py tabulates both).

An epoch is the same number of batches every epoch: dealt greedily, no stream is more than one
shard shorter than another, so every stream holds at least (N − (C − 1)·max shard) ÷ C samples,
and that bound, in whole optimizer steps, is the epoch. Each epoch leaves out fewer than one
shard per stream (different ones each epoch).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import numpy as np

from distnn.data.order import ShardOrder, Spec
from distnn.errors import UserError


class StreamOrder(ShardOrder):
    """ShardOrder's training order with `streams` > 1 (see the module's docstring)."""

    def __init__(
        self, counts: list[int], batch_size: int, world_size: int, rank: int, workers: int,
        seed: int, accum_steps: int, streams: int,
    ) -> None:  # fmt: skip
        super().__init__(counts, batch_size, world_size, rank, workers, seed, accum_steps)
        per_batch = batch_size * world_size
        if per_batch % streams or streams > len(self.counts):
            raise UserError(
                f"data.streams={streams} must divide the global batch of {per_batch} "
                f"(train.batch_size × world size) and be at most the {len(self.counts)} "
                "training shards"
            )
        self.streams, self.run = streams, per_batch // streams
        self._dealt: tuple[tuple[int, int] | None, list[np.ndarray]] = (None, [])
        shortest = (self.n - (streams - 1) * int(self.counts.max())) // streams
        self.steps = max(shortest, 0) // self.run // accum_steps * accum_steps

    def dealt(self) -> list[np.ndarray]:
        """The epoch's shards of each stream, in stream order (kept for the epoch: the cache's
        plan and the batches both need it)."""
        if self._dealt[0] != (self.seed, self.epoch):
            shards = self._shards()
            if (self.counts == self.counts[0]).all():
                # Equal shards: the fewest-samples rule, ties to the lowest stream, deals them
                # in turn (1 M shards: 20 ms instead of 1.3 s).
                dealt = [shards[c :: self.streams] for c in range(self.streams)]
            else:
                dealt = self._deal(shards.tolist())
            self._dealt = ((self.seed, self.epoch), dealt)
        return self._dealt[1]

    def _deal(self, shards: list[int]) -> list[np.ndarray]:
        """Each shard in turn to the stream with the fewest samples so far (lowest on a tie)."""
        heap = [(0, c) for c in range(self.streams)]
        streams: list[list[int]] = [[] for _ in range(self.streams)]
        counts = self.counts.tolist()
        for s in shards:
            held, c = heap[0]
            streams[c].append(s)
            heapq.heapreplace(heap, (held + counts[s], c))
        return [np.asarray(s, dtype=np.int64) for s in streams]

    def parts(self, rank: int) -> list[tuple[int, int, int]]:
        """(stream, start, end): the offsets within each run that rank `rank` reads."""
        lo, hi = rank * self.batch_size, (rank + 1) * self.batch_size
        out = []
        for c in range(self.streams):
            a, b = max(lo, c * self.run), min(hi, (c + 1) * self.run)
            if a < b:
                out.append((c, a - c * self.run, b - c * self.run))
        return out

    def __iter__(self) -> Iterator[Spec]:
        streams = self.dealt()
        ends = [np.cumsum(self.counts[s]) for s in streams]
        perms: dict[int, np.ndarray] = {}
        parts = self.parts(self.rank)
        for t in range(self.start, self.steps):
            rows = [
                self._slice(streams[c], ends[c], t * self.run + a, t * self.run + b, perms)
                for c, a, b in parts
            ]
            yield self.epoch, np.concatenate(rows)

    def _slice(
        self, shards: np.ndarray, ends: np.ndarray, p: int, q: int, perms: dict[int, np.ndarray]
    ) -> np.ndarray:
        """Sample indices at positions [p, q) of a stream (its shards and their ends)."""
        out = []
        k = int(np.searchsorted(ends, p, side="right"))
        while p < q:
            s, start = int(shards[k]), int(ends[k] - self.counts[shards[k]])
            if s not in perms:
                if len(perms) > 4 * self.streams:  # the shards still being read stay
                    perms.pop(next(iter(perms)))
                perms[s] = np.random.default_rng([self.seed, self.epoch, s]).permutation(
                    int(self.counts[s])
                )
            stop = min(q, int(ends[k]))
            out.append(self.first[s] + perms[s][p - start : stop - start])
            p, k = stop, k + 1
        return np.concatenate(out)

    def schedule(self, ranks: Sequence[int] = (0,)) -> list[np.ndarray]:
        """The shards that `ranks` (a node's) read in each batch from `start`, in order. A
        node's ranks are numbered contiguously, so their parts of a run are one span."""
        streams = self.dealt()
        spans: dict[int, tuple[int, int]] = {}
        for c, a, b in (p for r in ranks for p in self.parts(r)):
            lo, hi = spans.get(c, (a, b))
            spans[c] = (min(lo, a), max(hi, b))
        at = np.arange(self.start, self.steps) * self.run
        reads = []
        for c, (a, b) in spans.items():
            ends = np.cumsum(self.counts[streams[c]])
            first = np.searchsorted(ends, at + a, side="right").tolist()
            last = np.searchsorted(ends, at + b - 1, side="right").tolist()
            reads.append([streams[c][f : g + 1] for f, g in zip(first, last, strict=True)])
        if len(reads) == 1:
            return reads[0]
        return [np.concatenate(batch) for batch in zip(*reads, strict=True)]
