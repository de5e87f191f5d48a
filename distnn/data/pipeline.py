"""Source `shards`: webdataset tar shards (made by `python -m distnn.data.shard`) → batches.

The sampler (order.ShardOrder, in the main process) names each batch's samples as (shard,
member, global index); a worker reads them by byte offset — from the shard's sidecar index when
there is one, else from the tar's own headers, scanned once per worker without reading the data
(a compressed tar, which has no offsets to seek to, is inflated once per worker and held, up to
data.max_shard_bytes) — decodes them with PIL (up to data.max_pixels), augments them (the
transform's batched path, seeded per sample, as for the other sources) and collates the batch.
A global batch is a run of the stream (order.py): a worker touches one or two shards a batch.
Unreadable samples are reported back and handled in the main process by `data.on_error`
(errors.PolicyLoader).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from distnn.config import DataConfig
from distnn.data import manifest as mf
from distnn.data import transforms
from distnn.data.errors import Batch, DataErrors, SampleError
from distnn.data.order import ShardOrder, Spec
from distnn.data.sources import MAX_PIXELS, open_image
from distnn.data.tars import scan_shard, stream_shard
from distnn.data.transforms import EvalTransform, TrainTransform
from distnn.errors import UserError, reason

if TYPE_CHECKING:
    from distnn.config import Config
    from distnn.data import Loaders
    from distnn.parallel.env import Env


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


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image → H × W × 3 uint8, the pixels sources.decode gives."""
    with open_image(data, max_pixels) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


class ShardReader(Dataset):
    """Reads, decodes and augments a whole batch inside a worker; returns uint8 N×3×S×S,
    labels, and the problems met (unreadable samples are left out of the batch)."""

    def __init__(self, root: Path, shards: list[mf.Shard], classes: int,
                 transform: TrainTransform | EvalTransform, max_pixels: int = MAX_PIXELS,
                 max_shard_bytes: int = DataConfig.max_shard_bytes) -> None:  # fmt: skip
        self.root, self.shards, self.classes, self.transform = root, shards, classes, transform
        # data.max_pixels and data.max_shard_bytes travel to the workers with the reader.
        self.max_pixels, self.max_bytes = max_pixels, max_shard_bytes
        self._open()

    def _open(self) -> None:
        # Per process (the main one or a worker): open files, parsed indexes, scanned and
        # streamed shards.
        self._files: OrderedDict = OrderedDict()
        self._indexes: OrderedDict = OrderedDict()
        self._scans: OrderedDict = OrderedDict()
        self._streams: OrderedDict = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_files", "_indexes", "_scans", "_streams"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def sample(self, s: int, m: int) -> tuple[bytes, int]:
        """Image bytes and label of member m of shard s."""
        shard = self.shards[s]
        path = self.root / shard.file
        if shard.index is not None:
            # Indexed (our sharder's shards): the member's offset as tarfile found it when the
            # shard was written — no tar parsing at all, the cost that dominates at 32 px.
            f = self._file(s, path)
            index = _lru(self._indexes, s, lambda: self._index(shard, f), keep=4)
            _key, _ext, offset, length, label = index[m]
            data = _pread(f, offset, length, self.max_bytes)
        elif (scan := _lru(self._scans, s, lambda: scan_shard(path), keep=4)) is not None:
            # Another tool's plain tar: its headers, scanned once, give the offsets.
            sample, ext = self._member(*scan, m)
            f = self._file(s, path)
            data = _pread(f, *sample[ext], self.max_bytes)
            label = int(_pread(f, *sample["cls"], self.max_bytes))
        else:
            # A compressed tar: inflated into memory (up to 2 per worker, each up to max_bytes).
            streamed = _lru(self._streams, s, lambda: stream_shard(path, self.max_bytes), keep=2)
            sample, ext = self._member(*streamed, m)
            data, label = sample[ext], int(sample["cls"])
        if not 0 <= label < self.classes:
            raise SampleError(f"label {label} outside the {self.classes} classes")
        return data, label

    def _file(self, s: int, path: Path) -> Any:
        # Kept open across batches (an LRU of 8), so not a `with` block.
        return _lru(self._files, s, lambda: open(path, "rb"), keep=8)

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
        return mf.read_index(self.root / shard.index, shard, os.fstat(f.fileno()).st_size)

    def __getitem__(self, spec: Spec) -> Batch:
        epoch, items = spec
        images, labels, indices, problems = [], [], [], []
        for s, m, g in items.tolist():
            try:
                data, label = self.sample(s, m)
                images.append(decode_rgb(data, self.max_pixels))
            except Exception as e:  # PIL alone raises OSError, SyntaxError, ValueError, zlib.error
                problems.append(f"shard {self.shards[s].file} member {m}: {reason(e)}")
                continue
            labels.append(label)
            indices.append(g)
        x = self.transform.batch(images, indices, epoch)
        return x, torch.tensor(labels, dtype=torch.int64), problems

    def where(self, spec: Spec) -> str:
        """The shards a batch reads, for a line about the batch as a whole."""
        files = dict.fromkeys(self.shards[s].file for s in spec[1][:, 0].tolist())
        return f"shard{'s' if len(files) > 1 else ''} {', '.join(files)}"


def build(cfg: Config, env: Env, pin_memory: bool = False) -> Loaders:
    from distnn.data import Loaders, _loader  # the package imports this module

    d, t = cfg.data, cfg.train
    m = mf.load(d.root)
    train_shards, val_shards = m.split("train"), m.split(m.eval_split())
    mf.check(m, ["train", m.eval_split()], d.verify, (env.local_rank, env.local_world_size))
    counts = [s.count for s in train_shards]
    order = ShardOrder(
        counts, t.batch_size, env.world_size, env.rank, d.workers, t.seed, t.accum_steps
    )
    if order.steps == 0:
        global_batch = t.batch_size * env.world_size * t.accum_steps
        raise UserError(
            f"{order.n} training samples in {m.path} make no full global batch of "
            f"{global_batch} (train.batch_size × world size × train.accum_steps)"
        )
    val_order = ShardOrder(
        [s.count for s in val_shards], t.batch_size, env.world_size, env.rank, d.workers,
        t.seed, train=False,
    )  # fmt: skip
    n_classes, errors = len(m.classes), DataErrors()
    train, val = transforms.for_config(d, t.seed, m.mean)
    limits = (d.max_pixels, d.max_shard_bytes)
    train_reader = ShardReader(m.root, train_shards, n_classes, train, *limits)
    val_reader = ShardReader(m.root, val_shards, n_classes, val, *limits)
    return Loaders(
        train=_loader(train_reader, order, cfg, pin_memory, errors, train=True),
        val=_loader(val_reader, val_order, cfg, pin_memory, errors, train=False),
        train_order=order,
        classes=m.classes,
        mean=m.mean,
        std=m.std,
        train_size=order.n,
        val_size=val_order.n,
        errors=errors,
    )
