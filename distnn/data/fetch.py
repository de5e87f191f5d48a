"""Remote shards ahead of the order, in the node's cache (storage.Cache).

Local rank 0's training order is wrapped in `Prefetching`: as the DataLoader takes batch k
from it, a thread downloads the shards of batches k … k + `data.prefetch_shards` that the
node's cache lacks, FETCH_REQUESTS at a time, in the order they will be read. Under
`data.cache_limit` it first evicts the cached file needed furthest ahead by the same order
(one that this epoch does not read again goes first), never one of the batches being read or
fetched. The other ranks and the workers read through the same cache: a shard the thread has
not fetched yet is downloaded by whichever process asks first, once per node.

The order alone says what is needed when, so none of this changes a batch: a cache of any size
gives the same batches, and each shard is fetched at most once per epoch per node.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from distnn import storage
from distnn.data.order import ShardOrder, Spec
from distnn.data.pipeline import ShardSplit

log = logging.getLogger("distnn.data")
FETCH_REQUESTS = 4  # concurrent downloads per node
NEVER = float("inf")


class Fetcher:
    """Downloads ahead of a position in a schedule (the shards of each batch), in a thread."""

    def __init__(self, split: ShardSplit, cache: storage.Cache, ahead: int, limit: int,
                 behind: int) -> None:  # fmt: skip
        self.split, self.cache, self.ahead, self.limit = split, cache, ahead, limit
        self.behind = behind  # batches handed to workers that may still be reading
        self.names: dict[str, int] = {}  # cached file name → shard (its tar and its index)
        for s, shard in enumerate(split.shards):
            self.names[shard.file] = s
            if shard.index is not None:
                self.names[shard.index] = s
        self._cv = threading.Condition()
        self._schedule: list[np.ndarray] = []
        self._uses: dict[int, list[int]] = {}
        self._pos = 0
        self._flying: dict[int, threading.Thread] = {}
        self._failed: set[int] = set()  # given up on this pass: readers report them
        self._warned = False
        # Daemon threads: a download in flight never holds up the end of the process. Started
        # by the first pass, after the DataLoader has forked its workers.
        self._thread = threading.Thread(target=self._run, name="distnn-fetcher", daemon=True)

    def begin(self, schedule: list[np.ndarray]) -> None:
        """A new pass over the order: `schedule[b]` holds the shards batch b reads."""
        uses: dict[int, list[int]] = {}
        for b, shards in enumerate(schedule):
            for s in shards.tolist():
                uses.setdefault(s, []).append(b)
        with self._cv:
            self._schedule, self._uses, self._pos = schedule, uses, 0
            self._failed = set()
            self._cv.notify()
        if not self._thread.is_alive():
            self._thread.start()

    def at(self, k: int) -> None:
        """Batch k of the schedule is being handed to a worker."""
        with self._cv:
            self._pos = k
            self._cv.notify()

    def _run(self) -> None:
        while True:
            try:
                self._step()
            except OSError:  # a file another job sharing the cache removed: try again
                continue

    def _step(self) -> None:
        """Wait for news (0.2 s at most), then start the downloads the window lacks."""
        with self._cv:
            self._cv.wait(timeout=0.2)
            wanted = self._window(self._pos, self._pos + self.ahead + 1)
            in_use = set(self._window(self._pos - self.behind, self._pos + self.ahead + 1))
        self._flying = {s: t for s, t in self._flying.items() if t.is_alive()}
        for s in wanted:
            if len(self._flying) >= FETCH_REQUESTS:
                break
            shard = self.split.shards[s]
            skip = s in self._flying or s in self._failed
            if skip or self.cache.has(shard.file, shard.bytes):
                continue
            self._make_room(shard.bytes or 0, in_use)
            thread = threading.Thread(target=self._fetch, args=(s,), daemon=True)
            self._flying[s] = thread
            thread.start()

    def _window(self, start: int, end: int) -> list[int]:
        """The shards of batches [start, end), each once, in the order they are read."""
        batches = self._schedule[max(start, 0) : max(end, 0)]
        return list(dict.fromkeys(s for shards in batches for s in shards.tolist()))

    def _fetch(self, s: int) -> None:
        shard = self.split.shards[s]
        try:
            self.cache.get(shard.file, shard.bytes, shard.sha256)
            if shard.index is not None:
                self.cache.get(shard.index)
        except Exception:  # the reader that needs the shard meets the error again and reports
            self._failed.add(s)  # it (data.on_error; the run stops where storage stays
            # unreachable): this pass does not ask again

    def _next_use(self, name: str) -> float:
        s = self.names.get(name)
        uses = self._uses.get(s, []) if s is not None else []
        k = bisect.bisect_left(uses, self._pos)
        return uses[k] if k < len(uses) else NEVER

    def _make_room(self, size: int, in_use: set[int]) -> None:
        """Evict, furthest next use first, until `size` more bytes fit under the limit."""
        if not self.limit:
            return
        held = self.cache.held()
        flying = sum(self.split.shards[s].bytes or 0 for s in self._flying)
        total = sum(held.values()) + flying + size
        free = [n for n in held if self.names.get(n) not in in_use]
        free.sort(key=self._next_use)
        while total > self.limit and free:
            name = free.pop()
            self.cache.evict(name)
            total -= held[name]
        if total > self.limit and not self._warned:
            self._warned = True
            log.warning(
                "warning: data.cache_limit=%d is below the %d bytes of the shards being read "
                "and fetched at once; the cache holds those",
                self.limit, total,
            )  # fmt: skip


class Prefetching(Sampler[Spec]):
    """A shard order that tells the fetcher where the DataLoader has got to; it yields what
    the order yields."""

    def __init__(self, order: ShardOrder, fetcher: Fetcher, node: Sequence[int]) -> None:
        self.order, self.fetcher, self.node = order, fetcher, node  # node: its ranks

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[Spec]:
        self.fetcher.begin(self.order.schedule(self.node))
        for k, spec in enumerate(self.order):
            self.fetcher.at(k)
            yield spec
