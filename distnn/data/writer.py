"""Writes one split's tar shards in order with webdataset's TarWriter: a temporary name until
the shard is complete, then its sidecar index, its manifest entry, and the final name."""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds

from distnn import fsio
from distnn.data import manifest as mf

# Integer mtime: tarfile then writes no PAX header per member (a float mtime forces one, which
# doubles the cost of parsing the tar), and the same input gives byte-identical shards.
MTIME = 946684800  # 2000-01-01
# tar's end-of-archive blocks plus the record padding tarfile adds on close, at most.
TAR_END = 10240


def _member_size(n: int) -> int:
    return 512 + -(-n // 512) * 512  # header + data padded to tar's 512-byte blocks


class SplitWriter:
    """`add` samples in order; shards close at `max_count` samples or before `max_size` bytes
    would be passed. `shards` lists the manifest entries so far (reused ones first)."""

    def __init__(
        self, out: Path, split: str, max_count: int, max_size: int, done: list[dict]
    ) -> None:
        self.out, self.split, self.max_count, self.max_size = out, split, max_count, max_size
        self.shards: list[dict[str, Any]] = list(done)
        self.writer: wds.TarWriter | None = None
        self.rows: list[tuple[str, str, int]] = []

    def add(self, key: str, ext: str, image: bytes, label: int, meta: bytes, pos: int) -> bool:
        """Write one sample (`pos`: its place in the split's shuffled source list); True when
        this closed the previous shard."""
        need = _member_size(len(image)) + _member_size(len(meta)) + _member_size(len(str(label)))
        closed = False
        if self.writer is not None and (
            len(self.rows) >= self.max_count
            or self.writer.tarstream.offset + need + TAR_END > self.max_size
        ):
            closed = self.close(pos) is not None
        if self.writer is None:
            self.name = f"{self.split}-{len(self.shards):06d}"
            self.first = pos
            with self._reporting():  # a name of its own, created exclusively (fsio)
                self.tmp, self.file = fsio.create_temp(self.out / f"{self.name}.tar")
                self.writer = wds.TarWriter(self.file, encoder=False, mtime=MTIME)
        with self._reporting():
            self.writer.write(
                {"__key__": key, ext: image, "cls": str(label).encode(), "json": meta}
            )
        self.rows.append((key, ext, label))
        return closed

    def _reporting(self) -> contextlib.AbstractContextManager[None]:
        """A failed write of the open shard (a full disk) as one line naming it; abort(),
        which follows, drops the partial file."""
        return fsio.reporting(self.out / f"{self.name}.tar")

    def abort(self) -> None:
        """Stop mid-shard (an error): drop the unfinished shard, as a crash would."""
        if self.writer is not None:
            # Closing writes the tar's end, which fails again where a full disk stopped us.
            with contextlib.suppress(OSError):
                self.writer.close()
            with contextlib.suppress(OSError):
                self.file.close()
            self.tmp.unlink(missing_ok=True)
            self.writer = None

    def close(self, end: int) -> dict | None:
        """Finish the open shard (its sources end before `end`); its manifest entry."""
        if self.writer is None:
            return None
        with self._reporting():
            self.writer.close()  # the tar's end; the file is ours to close
            self.file.close()
        where = {}
        with tarfile.open(self.tmp, "r:") as tar:  # offsets as tarfile itself reads them
            for member in tar:
                where[member.name] = (member.offset_data, member.size)
        index = [[k, e, *where[f"{k}.{e}"], label] for k, e, label in self.rows]
        tar_name, idx_name = f"{self.name}.tar", f"{self.name}.idx.json"
        size = self.tmp.stat().st_size
        mf.write_json(self.out / idx_name, {"tar_bytes": size, "samples": index})
        entry = {
            "file": tar_name, "count": len(self.rows), "bytes": size,
            "sha256": mf.sha256_file(self.tmp), "index": idx_name,
            "formats": dict(Counter(e for _, e, _ in self.rows)), "source_range": [self.first, end],
        }  # fmt: skip
        os.replace(self.tmp, self.out / tar_name)  # complete, or absent: never half a shard
        self.shards.append(entry)
        self.writer, self.rows = None, []
        return entry


def reusable(out: Path, entries: list[dict]) -> list[dict]:
    """The leading recorded shards that are still complete: same size and sha256."""
    kept = []
    for e in entries:
        tar, idx = out / e["file"], out / e.get("index", "")
        ok = tar.is_file() and idx.is_file() and tar.stat().st_size == e["bytes"]
        if not ok or mf.sha256_file(tar) != e["sha256"]:
            break
        kept.append(e)
    return kept


def update_totals(doc: dict, split: str, shards: list[dict]) -> None:
    """Record `split`'s shards in the manifest `doc` and refresh its totals."""
    doc["splits"][split] = {
        "count": sum(s["count"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    splits = doc["splits"].values()
    formats: Counter = Counter()
    for sh in (sh for s in splits for sh in s["shards"]):
        formats.update(sh.get("formats", {}))
    doc["image_encoding"]["formats"] = dict(formats)
    doc["totals"] = {
        "count": sum(s["count"] for s in splits),
        "bytes": sum(s["bytes"] for s in splits),
        "shards": sum(len(s["shards"]) for s in splits),
    }
