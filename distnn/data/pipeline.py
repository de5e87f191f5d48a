"""Source `shards`: webdataset tar shards (made by `python -m distnn.data.shard`) → batches.

The sampler (order.ShardOrder, in the main process) names each batch's samples as (shard,
member, global index); a worker reads them by byte offset — from the shard's sidecar index when
there is one, else from the tar's own headers, scanned once per worker without reading the data
(a compressed tar, which has no offsets to seek to, is parsed whole by webdataset) — decodes
them with PIL, augments them (the transform's batched path, seeded per sample, as for the other
sources) and collates the batch.
A global batch is a run of the stream (order.py): a worker touches one or two shards a batch.
Unreadable samples are reported back and handled in the main process by `data.on_error`
(errors.PolicyLoader).
"""

from __future__ import annotations

import io
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from distnn.data import manifest as mf
from distnn.data.augment import Augment
from distnn.data.errors import Batch, DataErrors, SampleError
from distnn.data.order import ShardOrder, Spec
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


# webdataset's names: `__key__`-style names (at the top, or as a folder) are metadata, not samples.
_META = re.compile(r"__[^/]*__($|/)")
_BLOCK = 512
_ZEROS = bytes(_BLOCK)
_NEXT = (b"x", b"g", b"L", b"K")  # PAX and GNU headers about the next file (g: about all)


def _number(field: bytes) -> int:
    """A tar header's numeric field: octal text, or base-256 where the high bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _checksum_ok(block: bytes) -> bool:
    """The header's sum with the checksum field as spaces, bytes unsigned or (old tars) signed."""
    try:
        want = _number(block[148:156])
    except ValueError:
        return False
    unsigned = 256 + sum(block) - sum(block[148:156])
    if want == unsigned:
        return True
    rest = block[:148] + block[156:]
    return want == unsigned - 256 * sum(b > 127 for b in rest)


def _pax(data: bytes) -> dict[str, str]:
    """A PAX extended header's records (`LEN key=value\n` each)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


class _NotATar(Exception):
    pass


def _tar_files(fd: int, end: int) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of a plain tar, from its headers alone —
    one 512-byte read per file, the data skipped — as tarfile reads them: ustar, GNU long names,
    PAX. Raises _NotATar where the first header is none, ValueError where a file's data is cut
    off; ends at the end-of-archive block, the end of the file, or a bad header (as tarfile)."""
    offset, long_name, pax = 0, None, {}
    while True:
        block = os.pread(fd, _BLOCK, offset)
        if block == _ZEROS:
            return
        if len(block) < _BLOCK or not _checksum_ok(block):
            if offset == 0:
                raise _NotATar
            return
        kind, data = block[156:157], offset + _BLOCK
        size = int(pax["size"]) if "size" in pax and kind not in _NEXT else None
        size = _number(block[124:136]) if size is None else size
        offset = data + -(-size // _BLOCK) * _BLOCK
        if offset > end:
            raise ValueError("truncated")
        if kind == b"x":  # PAX records for the next file
            pax = _pax(os.pread(fd, size, data))
        elif kind == b"L":  # a GNU long name for the next file
            long_name = _text(os.pread(fd, size, data))
        if kind in _NEXT:
            continue
        name = _text(block[:100])
        if block[257:265] == b"ustar\x0000" and block[345] != 0:
            name = f"{_text(block[345:500])}/{name}"
        name = pax.get("path", long_name or name)
        long_name, pax = None, {}
        if kind in (b"0", b"7") or (kind == b"\0" and not name.endswith("/")):
            yield name, data, size


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def scan_shard(path: Path) -> tuple[list[dict], str | None] | None:
    """Each sample's files as webdataset groups them (`__key__`, then extension → (byte offset,
    size)) from a plain tar's headers, and why the scan stopped early if it did (from the damage
    on, members are lost, as when webdataset streams the tar). None where the tar has no header
    to start from (compressed, or damaged there): stream it instead."""
    from webdataset.tariterators import base_plus_ext

    samples: list[dict] = []
    current: dict | None = None
    with open(path, "rb") as f:
        try:
            for name, data, size in _tar_files(f.fileno(), os.fstat(f.fileno()).st_size):
                key, ext = base_plus_ext(name)
                if _META.match(name) or key is None:
                    continue
                ext = ext.lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        samples.append(current)
                    current = {"__key__": key}
                if ext in current:
                    raise ValueError(f"{name} twice")
                current[ext] = (data, size)
        except _NotATar:
            return None
        except ValueError as e:  # damage; a bad number or PAX record too
            return samples, f"tar unreadable after {len(samples)} samples ({e})"
    if current is not None:
        samples.append(current)
    return samples, None


def _pread(f: Any, offset: int, length: int) -> bytes:
    data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise SampleError(f"truncated: {len(data)} of {length} bytes")
    return data


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image → H × W × 3 uint8, the pixels sources.decode gives."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


class ShardReader(Dataset):
    """Reads, decodes and augments a whole batch inside a worker; returns uint8 N×3×S×S,
    labels, and the problems met (unreadable samples are left out of the batch)."""

    def __init__(self, root: Path, shards: list[mf.Shard], classes: int,
                 transform: TrainTransform | EvalTransform) -> None:  # fmt: skip
        self.root, self.shards, self.classes, self.transform = root, shards, classes, transform
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
            data = _pread(f, offset, length)
        elif (scan := _lru(self._scans, s, lambda: scan_shard(path), keep=4)) is not None:
            # Another tool's plain tar: its headers, scanned once, give the offsets.
            sample, ext = self._member(*scan, m)
            f = self._file(s, path)
            data, label = _pread(f, *sample[ext]), int(_pread(f, *sample["cls"]))
        else:
            # A compressed tar: webdataset parses it into memory (up to 2 per worker).
            sample, ext = self._member(*_lru(self._streams, s, lambda: stream_shard(path), 2), m)
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
                images.append(decode_rgb(data))
            except Exception as e:  # PIL alone raises OSError, SyntaxError, ValueError, zlib.error
                problems.append(f"shard {self.shards[s].file} member {m}: {reason(e)}")
                continue
            labels.append(label)
            indices.append(g)
        x = self.transform.batch(images, indices, epoch)
        return x, torch.tensor(labels, dtype=torch.int64), problems


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
    augment = Augment.from_config(d, m.mean)
    train_reader = ShardReader(
        m.root, train_shards, n_classes, TrainTransform(size, t.seed, d.hflip, augment)
    )
    val_reader = ShardReader(m.root, val_shards, n_classes, EvalTransform(size))
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
