"""Source `shards`: webdataset tar shards (made by `python -m distnn.data.shard`) as Splits.

Global sample index → (shard, member) by the shards' cumulative counts. A member is read by
byte offset — from the shard's sidecar index when there is one, else from the tar's own
headers, scanned once per process without reading the data (a compressed tar, which has no
offsets to seek to, is inflated once per process and held, up to data.max_shard_bytes). The
order (order.ShardOrder, from `blocks`) keeps a global batch to one or two shards; the Reader
(data/__init__.py) decodes, augments and collates, as for every source.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from distnn import storage
from distnn.config import DataConfig
from distnn.data import manifest as mf
from distnn.data.errors import SampleError
from distnn.data.sources import Dataset
from distnn.data.tars import scan_shard, stream_shard
from distnn.errors import reason


def _lru(cache: OrderedDict, key: Any, make: Any, keep: int) -> Any:
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > keep:
        cache.popitem(last=False)
    return value


def _pread(f: Any, offset: int, length: int, max_bytes: int) -> bytes:
    if length > max_bytes:
        raise SampleError(f"a member of {length:,} bytes, over data.max_shard_bytes={max_bytes:,}")
    data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise SampleError(f"truncated: {len(data)} of {length} bytes")
    return data


class ShardSplit:
    """The samples of a split's shards, in manifest order: a Split (sources.py)."""

    def __init__(
        self, files: storage.Local | storage.Cache, shards: list[mf.Shard], classes: int,
        max_shard_bytes: int = DataConfig.max_shard_bytes,
    ) -> None:  # fmt: skip
        self.files, self.shards, self.classes = files, shards, classes
        self.max_bytes = max_shard_bytes  # travels to the workers with the split
        self.blocks = [s.count for s in shards]
        self.first = np.concatenate([[0], np.cumsum(self.blocks, dtype=np.int64)])
        self._open()

    def _open(self) -> None:
        # Per process (the main one or a worker): open files, parsed indexes, scanned and
        # streamed shards, and the remote shards that could not be fetched (tried once).
        self._failed: dict[int, str] = {}
        self._files: OrderedDict = OrderedDict()
        self._indexes: OrderedDict = OrderedDict()
        self._scans: OrderedDict = OrderedDict()
        self._streams: OrderedDict = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_failed", "_files", "_indexes", "_scans", "_streams"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return int(self.first[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Sample i's (shard, member)."""
        s = int(np.searchsorted(self.first, i, side="right")) - 1
        return s, i - int(self.first[s])

    def where(self, i: int) -> str:
        s, m = self.locate(i)
        return f"shard {self.shards[s].file} member {m}"

    def key(self, i: int) -> str:
        s, m = self.locate(i)
        return f"{self.shards[s].file}:{m}"

    def sample(self, i: int) -> tuple[bytes, int]:
        """Image bytes and label of sample i."""
        s, m = self.locate(i)
        shard = self.shards[s]
        if shard.index is not None:
            # Indexed (our sharder's shards): the member's offset as tarfile found it when the
            # shard was written — no tar parsing at all, the cost that dominates at 32 px.
            f = self._file(s)
            index = _lru(self._indexes, s, lambda: self._index(shard, f), keep=4)
            _key, _ext, offset, length, label = index[m]
            data = _pread(f, offset, length, self.max_bytes)
        elif (scan := _lru(self._scans, s, lambda: scan_shard(self._tar(s)), keep=4)) is not None:
            # Another tool's plain tar: its headers, scanned once, give the offsets.
            sample, ext = self._member(*scan, m)
            f = self._file(s)
            data = _pread(f, *sample[ext], self.max_bytes)
            label = int(_pread(f, *sample["cls"], self.max_bytes))
        else:
            # A compressed tar: inflated into memory (up to 2 per worker, each up to max_bytes).
            streamed = _lru(self._streams, s, lambda: self._stream(s), keep=2)
            sample, ext = self._member(*streamed, m)
            data, label = sample[ext], int(sample["cls"])
        if not 0 <= label < self.classes:
            raise SampleError(f"label {label} outside the {self.classes} classes")
        return data, label

    def _tar(self, s: int) -> Path:
        """Shard s's local file, downloaded first where the shards are remote. A remote shard
        that is missing or fails verification fails each of its samples, fetched once."""
        if s in self._failed:
            raise SampleError(self._failed[s])
        shard = self.shards[s]
        try:
            return self.files.get(shard.file, shard.bytes, shard.sha256)
        except (FileNotFoundError, storage.Unverified) as e:
            self._failed[s] = reason(e)
            raise SampleError(self._failed[s]) from None

    def _stream(self, s: int) -> tuple[list[dict], str | None]:
        return stream_shard(self._tar(s), self.max_bytes)

    def _file(self, s: int) -> Any:
        # Kept open across batches (an LRU of 8), so not a `with` block.
        return _lru(self._files, s, lambda: self._open_tar(s), keep=8)

    def _open_tar(self, s: int) -> Any:
        try:
            return open(self._tar(s), "rb")
        except FileNotFoundError:  # a remote one evicted between the cache's check and here:
            return open(self._tar(s), "rb")  # fetched again

    @staticmethod
    def _member(samples: list[dict], why: str | None, m: int) -> tuple[dict, str]:
        """Member m of a scanned or streamed tar, and its image's extension."""
        if m >= len(samples):
            raise SampleError(why or f"tar holds {len(samples)} samples, not {m + 1}")
        sample = samples[m]
        ext = next((e for e in mf.IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            raise SampleError(f"{sample['__key__']} has no image or no .cls member")
        return sample, ext

    def _index(self, shard: mf.Shard, f: Any) -> list[list]:
        path = self.files.get(shard.index)
        return mf.read_index(path, shard, os.fstat(f.fileno()).st_size)


def load(d: DataConfig, node: tuple[int, int] = (0, 1)) -> Dataset:
    """The manifest at `d.root` (a directory or a URL) as a Dataset of ShardSplits. Local
    shards are checked here (`d.verify`: this node's part of them, `node` = (local rank, local
    world size)); remote ones as each arrives in the node's cache (size and sha256)."""
    files = storage.files(d.root, d.storage_options, d.retry_s, d.cache_dir)
    m = mf.load(d.root, files)
    evaluate = m.eval_split()
    if isinstance(files, storage.Local):
        files = storage.Local(m.root)  # data.root may name the manifest itself
        mf.check(m, ["train", evaluate], d.verify, node)
    k = len(m.classes)
    train, val = (ShardSplit(files, m.split(s), k, d.max_shard_bytes) for s in ("train", evaluate))
    return Dataset("shards", train, val, m.classes, m.mean, m.std)
