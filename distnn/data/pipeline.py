"""Source `shards`: webdataset tar shards (made by `python -m distnn.data.shard`) → batches.

The sampler (order.ShardOrder, in the main process) names each batch's samples as (shard,
member, global index); a worker reads them — by byte offset from the shard's sidecar index
when there is one, else by streaming the tar with webdataset — decodes them with PIL, augments
them (seeded per sample, as the other sources) and collates the batch. Unreadable samples are
reported back and handled in the main process by `data.on_error` (errors.PolicyLoader).
"""

from __future__ import annotations

import io
import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from distnn.data import manifest as mf
from distnn.data.errors import Batch, DataErrors, SampleError
from distnn.data.order import ShardOrder, Spec
from distnn.data.transforms import SMALL, EvalTransform, TrainTransform
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


def stream_shard(path: Path) -> tuple[list[dict], str | None]:
    """All samples of a tar via webdataset's tar iterator, and why it stopped early if it did
    (a damaged tar loses its members from the damage on; earlier ones stay usable)."""
    from webdataset import tariterators

    samples: list[dict] = []
    try:
        with open(path, "rb") as f:
            files = tariterators.tar_file_expander([{"url": str(path), "stream": f}])
            samples.extend(tariterators.group_by_keys(files))
    except Exception as e:  # tarfile raises ReadError, EOFError, OSError... for damage
        return samples, f"tar unreadable after {len(samples)} samples ({type(e).__name__}: {e})"
    return samples, None


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image → H × W × 3 uint8, the pixels sources.decode gives."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


class ShardReader(Dataset):
    """Reads, decodes and augments a whole batch inside a worker; returns uint8 N×3×S×S,
    labels, and the problems met (unreadable samples are left out of the batch)."""

    def __init__(self, root: Path, shards: list[mf.Shard], classes: int, size: int,
                 transform: TrainTransform | EvalTransform) -> None:  # fmt: skip
        self.root, self.shards, self.classes = root, shards, classes
        self.size, self.transform = size, transform
        self._open()

    def _open(self) -> None:
        # Per process (the main one or a worker): open files, parsed indexes, streamed shards.
        self._files: OrderedDict = OrderedDict()
        self._indexes: OrderedDict = OrderedDict()
        self._streams: OrderedDict = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_files", "_indexes", "_streams"):
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
            # Indexed (our sharder's shards): read the member's bytes at the offset tarfile
            # found when the shard was written — no per-epoch tar parsing, the cost that
            # otherwise dominates at 32 px.
            # Kept open across batches (an LRU of 8), so not a `with` block.
            f = _lru(self._files, s, lambda: open(path, "rb"), keep=8)  # noqa: SIM115
            index = _lru(self._indexes, s, lambda: self._index(shard, f), keep=4)
            _key, _ext, offset, length, label = index[m]
            data = os.pread(f.fileno(), length, offset)
            if len(data) != length:
                raise SampleError(f"truncated: {len(data)} of {length} bytes")
        else:
            # Another tool's shard: webdataset parses it once into memory (up to 2 shards per
            # worker), and the members are taken from there in the permuted order.
            samples, why = _lru(self._streams, s, lambda: stream_shard(path), keep=2)
            if m >= len(samples):
                raise SampleError(why or f"tar holds {len(samples)} samples, not {m + 1}")
            sample = samples[m]
            ext = next((e for e in mf.IMAGE_EXTS if e in sample), None)
            if ext is None or "cls" not in sample:
                raise SampleError(f"{sample['__key__']} has no image or no .cls member")
            data, label = sample[ext], int(sample["cls"])
        if not 0 <= label < self.classes:
            raise SampleError(f"label {label} outside the {self.classes} classes")
        return data, label

    def _index(self, shard: mf.Shard, f: Any) -> list[list]:
        return mf.read_index(self.root / shard.index, shard, os.fstat(f.fileno()).st_size)

    def __getitem__(self, spec: Spec) -> Batch:
        epoch, items = spec
        images, labels, indices, problems = [], [], [], []
        for s, m, g in items.tolist():
            try:
                data, label = self.sample(s, m)
                images.append(decode_rgb(data))
            except Exception as e:  # PIL alone raises OSError, SyntaxError, ValueError, zlib.error
                problems.append(f"shard {self.shards[s].file} member {m}: {reason(e)}")
                continue
            labels.append(label)
            indices.append(g)
        x = self._assemble(images, indices, epoch)
        return x, torch.tensor(labels, dtype=torch.int64), problems

    def _assemble(self, images: list[np.ndarray], indices: list[int], epoch: int) -> torch.Tensor:
        s, t = self.size, self.transform
        x = torch.empty(len(images), 3, s, s, dtype=torch.uint8)
        train, pad = isinstance(t, TrainTransform), 4
        # Images already at the training size (≤ 64 px: CIFAR, digits) take a batched path in
        # HWC: TrainTransform's pad + crop + flip, drawn from the same per-sample RNG, on one
        # zero-padded buffer, then one transpose for them all. Larger ones go through the
        # transform per sample in CHW (a per-sample HWC round trip costs ~0.7 ms at 224 px).
        small = [j for j, img in enumerate(images) if s <= SMALL and img.shape[:2] == (s, s)]
        hwc = np.zeros((len(small), s + 2 * pad, s + 2 * pad, 3), np.uint8)
        out = np.empty((len(small), s, s, 3), np.uint8)
        for k, j in enumerate(small):
            if not train:
                out[k] = images[j]  # eval at the stored size: nothing to do
                continue
            rng = random.Random(f"{t.seed}:{epoch}:{indices[j]}")
            hwc[k, pad : pad + s, pad : pad + s] = images[j]
            top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
            crop = hwc[k, top : top + s, left : left + s]
            out[k] = crop[:, ::-1] if t.hflip and rng.random() < 0.5 else crop
        if small:
            x[small] = torch.from_numpy(out).permute(0, 3, 1, 2)
        for j in sorted(set(range(len(images))) - set(small)):
            chw = torch.from_numpy(np.array(images[j])).permute(2, 0, 1)
            x[j] = t(chw, indices[j], epoch)
        return x


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
    size, n_classes, errors = d.image_size, len(m.classes), DataErrors()
    train_reader = ShardReader(
        m.root, train_shards, n_classes, size, TrainTransform(size, t.seed, d.hflip)
    )
    val_reader = ShardReader(m.root, val_shards, n_classes, size, EvalTransform(size))
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
