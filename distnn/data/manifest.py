"""The manifest: the contract between the sharder and the loader (`OUT/manifest.json`).

Required fields (what another tool must write to hand us its shards):

    {"format": "distnn-shards", "version": 1, "classes": ["cat", "dog"],
     "splits": {"train": {"shards": [{"file": "train-000000.tar", "count": 1000}, ...]},
                "val": {"shards": [...]}}}

Optional: per shard `bytes`, `sha256` (checked by `data.verify=true`) and `index` (a sidecar
JSON with each sample's byte offset inside the tar, which lets the loader skip tar parsing);
`dataset`, `mean`/`std` (0-255 units), `image_encoding`, `skipped`, `created`, per-split
`count`/`bytes` totals. The sharder writes all of them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distnn import fsio, storage
from distnn.data.sources import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from distnn.errors import UserError

FORMAT = "distnn-shards"
VERSION = 1
NAME = "manifest.json"
# Image members the loader recognises, in order of preference when a sample has several.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Shard:
    file: str
    count: int
    bytes: int | None = None
    sha256: str | None = None
    index: str | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path | str  # a URL where the shards are remote
    dataset: str
    classes: list[str]
    splits: dict[str, list[Shard]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def root(self) -> Path:
        return Path(self.path).parent

    def split(self, name: str) -> list[Shard]:
        if name not in self.splits:
            raise UserError(f"{self.path}: no split {name!r} (has {', '.join(self.splits)})")
        return self.splits[name]

    def eval_split(self) -> str:
        """`val` when present, else `test` (CIFAR's official test batch is its eval set)."""
        for name in ("val", "test"):
            if name in self.splits:
                return name
        raise UserError(f"{self.path}: no 'val' or 'test' split to evaluate on")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    fsio.write_text(path, json.dumps(data, indent=1) + "\n")


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"manifest {path}: {where} has no {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UserError(f"manifest {path}: {where}.{key} is {value!r}, not {_kind(kind)}")
    return value


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


# Names of files in the shards' own directory, and nothing a shell or the node's cache reads
# specially: a remote one becomes a cache file (its lock and ledger start with a dot) and goes
# into a pipe: command.
_NAME_PUNCTUATION = "._+=,~@-"
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9{re.escape(_NAME_PUNCTUATION)}]*\Z")


def _shard(entry: Any, where: str, path: Path) -> Shard:
    file = _need(entry, "file", str, where, path)
    count = _need(entry, "count", int, where, path)
    opt = {k: entry.get(k) for k in ("bytes", "sha256", "index")}
    names = [file] if opt["index"] is None else [file, opt["index"]]
    if count < 0 or not all(isinstance(n, str) and _NAME.match(n) for n in names):
        raise UserError(
            f"manifest {path}: {where} has a bad file {names!r} (names of letters, digits and "
            f"{_NAME_PUNCTUATION}, not starting with one of those) or count {count}"
        )
    return Shard(file, count, **opt)


def _missing(path: Path | str) -> UserError:
    return UserError(
        f"no shard manifest at {str(path)!r}; make shards with "
        "`python -m distnn.data.shard cifar10|cifar100|imagefolder|pkg.module:callable SRC OUT`"
    )


def _read(
    root: str | Path, files: storage.Local | storage.Cache | None
) -> tuple[Path | str, bytes]:
    """The manifest's path (a URL for remote files) and bytes."""
    if isinstance(files, storage.Cache):
        url = files.remote.url(NAME)
        try:
            return storage.shown(url), files.read(NAME)
        except FileNotFoundError:
            raise _missing(storage.shown(url)) from None
    path = storage.local_path(root)
    if path.is_dir() or not path.suffix:
        path = path / NAME
    if not path.is_file():
        raise _missing(path)
    return path, path.read_bytes()


def load(root: str | Path, files: storage.Local | storage.Cache | None = None) -> Manifest:
    """Read and check the schema of `root/manifest.json` (or `root` itself if it is a file);
    `files`: where a remote root's manifest is read (storage.files)."""
    path, raw = _read(root, files)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"manifest {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"manifest {path}: 'format' must be {FORMAT!r}")
    version = _need(data, "version", int, "the manifest", path)
    if version > VERSION:
        raise UserError(f"manifest {path} has version {version}; this distnn reads up to {VERSION}")
    classes = _need(data, "classes", list, "the manifest", path)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"manifest {path}: 'classes' must be a non-empty list of names")
    splits: dict[str, list[Shard]] = {}
    for name, split in _need(data, "splits", dict, "the manifest", path).items():
        entries = _need(split, "shards", list, f"split {name!r}", path)
        splits[name] = [_shard(e, f"split {name!r} shard {i}", path) for i, e in enumerate(entries)]
    dataset = str(data.get("dataset", "shards"))
    cifar = dataset.startswith("cifar")
    mean = tuple(data.get("mean") or (CIFAR_MEAN if cifar else IMAGENET_MEAN))
    std = tuple(data.get("std") or (CIFAR_STD if cifar else IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"manifest {path}: 'mean' and 'std' take three numbers each")
    return Manifest(path, dataset, classes, splits, mean, std)  # type: ignore[arg-type]


def count_samples(path: Path) -> int:
    """Samples in a tar as webdataset groups them (members sharing a key are one sample), up
    to any damage: from a plain tar's headers alone, a compressed one inflated under the
    default data.max_shard_bytes."""
    from distnn.data.tars import scan_shard, stream_shard

    samples, _why = scan_shard(path) or stream_shard(path)
    return len(samples)


def check(m: Manifest, splits: list[str], verify: bool, part: tuple[int, int] = (0, 1)) -> None:
    """Every listed shard exists; with `verify`, this process's share (`part` = (i, n): every
    n-th shard from the i-th) also matches its sha256, sample count and index."""
    i, n = part
    for split in splits:
        for k, shard in enumerate(m.split(split)):
            tar = m.root / shard.file
            if not tar.is_file():
                raise UserError(f"shard {shard.file} listed in {m.path} is missing")
            if not verify or k % n != i:
                continue
            size = tar.stat().st_size
            if shard.bytes is not None and size != shard.bytes:
                raise UserError(f"shard {shard.file}: {size} bytes, manifest says {shard.bytes}")
            if shard.sha256 is not None:
                digest = sha256_file(tar)
                if digest != shard.sha256:
                    raise UserError(
                        f"shard {shard.file}: sha256 {digest[:16]}…, manifest says "
                        f"{shard.sha256[:16]}…"
                    )
            try:
                found = count_samples(tar)
            except Exception as e:  # tarfile raises several types for damaged archives
                raise UserError(f"shard {shard.file} is not a readable tar: {e}") from None
            if found != shard.count:
                raise UserError(f"shard {shard.file}: {found} samples, manifest says {shard.count}")
            if shard.index is not None:
                index = read_index(m.root / shard.index, shard, size)
                if len(index) != shard.count:
                    raise UserError(
                        f"shard {shard.file}: index {shard.index} lists {len(index)} "
                        f"samples, manifest says {shard.count}"
                    )


def read_index(path: Path, shard: Shard, tar_bytes: int) -> list[list]:
    """The sidecar index: [key, ext, offset, size, label] per sample, in tar order. It names
    the tar's size so an index left over from another tar is refused, not misread."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"shard {shard.file}: index {path.name} unreadable: {e}") from None
    if data.get("tar_bytes") != tar_bytes:
        raise UserError(
            f"shard {shard.file}: index {path.name} describes a tar of {data.get('tar_bytes')} "
            f"bytes, the tar has {tar_bytes}"
        )
    return data["samples"]
