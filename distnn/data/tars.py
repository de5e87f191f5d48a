"""Tar shards read from their headers alone: where each member's data lies in a plain tar,
and the members of a compressed one inflated in one pass, up to a byte budget. Hostile headers
(a zero-length PAX record, a negative size, a header past the data) end the scan with a reason,
never a loop: every header moves it at least 512 bytes on."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from distnn.config import DataConfig

# webdataset's names: `__key__`-style names (at the top, or as a folder) are metadata, not samples.
_META = re.compile(r"__[^/]*__($|/)")
_BLOCK = 512
_ZEROS = bytes(_BLOCK)
_NEXT = (b"x", b"g", b"L", b"K")  # PAX and GNU headers about the next file (g: about all)
# A PAX or GNU long-name header is read whole: far above any real one, small enough to hold.
_MAX_META = 1 << 20
_SKIP = 1 << 20  # a stream's unwanted data is read and dropped in pieces of this size
# Compressed tars by their first bytes (what tarfile's "r|*" and webdataset open too).
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))

Pread = Callable[[int, int], bytes]  # (length, offset) → bytes, short at the end of the data


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
    """A PAX extended header's records (`LEN key=value\n` each, LEN counting the whole record).
    A record that does not advance past its own length, runs past the data or is not
    `key=value\n` is a ValueError: a hostile length must not stall or mislead the scan."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        length = data[pos:space] if space > pos else b""
        end = pos + int(length) if length.isdigit() else -1
        record = data[space + 1 : end]
        if end <= space + 1 or end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError(f"bad PAX record {data[pos : pos + 24]!r}")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


class _NotATar(Exception):
    pass


def _tar_files(pread: Pread, end: int | None) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of a tar, from its headers alone — one
    512-byte read per file, the data skipped — as tarfile reads them: ustar, GNU long names,
    PAX. `end`: the tar's size where known (a file), None for a stream. Ends at the
    end-of-archive block or the end of the data between files; raises _NotATar where the first
    header is none, ValueError for any other damage: a bad header, a size that does not move
    the scan forward, a file cut off. Each header moves it ≥ 512 bytes on: it cannot loop."""
    offset, long_name, pax = 0, None, {}
    while True:
        block = pread(_BLOCK, offset)
        if block == _ZEROS or (offset > 0 and not block):
            return
        if len(block) < _BLOCK or not _checksum_ok(block):
            if offset == 0:
                raise _NotATar
            raise ValueError(f"bad tar header at byte {offset}")
        kind, data = block[156:157], offset + _BLOCK
        size = int(pax["size"]) if "size" in pax and kind not in _NEXT else None
        size = _number(block[124:136]) if size is None else size
        if size < 0:
            raise ValueError(f"tar header at byte {offset} gives a size of {size}")
        offset = data + -(-size // _BLOCK) * _BLOCK
        if end is not None and offset > end:
            raise ValueError("truncated")
        if kind in (b"x", b"L"):
            if size > _MAX_META:
                raise ValueError(f"a {size}-byte extended header at byte {data - _BLOCK}")
            meta = pread(size, data)
            if len(meta) < size:
                raise ValueError("truncated")
            if kind == b"x":  # PAX records for the next file
                pax = _pax(meta)
            else:  # a GNU long name for the next file
                long_name = _text(meta)
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


def _group(files: Iterable[tuple[str, Any]]) -> Iterator[dict]:
    """Files (name, what is known of its data) as webdataset groups them into samples:
    consecutive files sharing a key, `__key__` then extension → that value."""
    from webdataset.tariterators import base_plus_ext

    current: dict | None = None
    for name, value in files:
        key, ext = base_plus_ext(name)
        if _META.match(name) or key is None:
            continue
        ext = ext.lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key}
        if ext in current:
            raise ValueError(f"{name} twice")
        current[ext] = value
    if current is not None:
        yield current


def _samples(files: Iterable[tuple[str, Any]]) -> tuple[list[dict], str | None]:
    """The samples of a tar's files, and why the tar stopped early if it did (from the damage
    on, members are lost, as when webdataset streams a tar; earlier ones stay usable)."""
    samples: list[dict] = []
    try:
        samples.extend(_group(files))  # keeps what it appended when the files raise
    except _NotATar:
        raise
    except Exception as e:  # damage: ValueError; OSError, EOFError, zlib.error... when inflating
        return samples, f"tar unreadable after {len(samples)} samples ({e})"
    return samples, None


def scan_shard(path: Path) -> tuple[list[dict], str | None] | None:
    """Each sample's files as webdataset groups them (`__key__`, then extension → (byte offset,
    size)) from a plain tar's headers, and why the scan stopped early if it did. None where the
    tar has no header to start from (compressed, or damaged there): stream it instead."""
    with open(path, "rb") as f:
        fd = f.fileno()
        files = _tar_files(lambda n, at: os.pread(fd, n, at), os.fstat(fd).st_size)
        try:
            return _samples((name, (data, size)) for name, data, size in files)
        except _NotATar:
            return None


class _Stream:
    """A decompressing file read front to back as if by offset: the headers and the data asked
    for are read, everything else is dropped in pieces, so memory stays bounded."""

    def __init__(self, f: Any) -> None:
        self.f, self.pos = f, 0

    def pread(self, length: int, offset: int) -> bytes:
        while self.pos < offset:
            skipped = len(self.f.read(min(offset - self.pos, _SKIP)))
            if not skipped:
                raise ValueError("truncated")
            self.pos += skipped
        data = self.f.read(length)
        self.pos += len(data)
        return data


def stream_shard(
    path: Path, max_bytes: int = DataConfig.max_shard_bytes
) -> tuple[list[dict], str | None]:
    """All samples of a compressed tar (gzip, bz2, xz) in memory, read in one pass (it has no
    offsets to read members by), and why it stopped early if it did: damage, or more than
    `max_bytes` of members and their headers (data.max_shard_bytes), which a bomb of a few MB
    inflates to; the members from there on are lost, the shard's earlier samples stay usable."""
    with open(path, "rb") as f:
        magic = f.read(6)
    opener = next((o for prefix, o in _COMPRESSED if magic.startswith(prefix)), open)
    with opener(path, "rb") as f:
        stream = _Stream(f)

        def files() -> Iterator[tuple[str, bytes]]:
            kept = 0
            for name, data, size in _tar_files(stream.pread, None):
                kept += _BLOCK + size
                if kept > max_bytes:
                    raise ValueError(
                        f"{name}: the shard inflates past data.max_shard_bytes={max_bytes:,}"
                    )
                member = stream.pread(size, data)
                if len(member) < size:
                    raise ValueError("truncated")
                yield name, member

        try:
            return _samples(files())
        except _NotATar:
            return [], "not a tar, nor a gzip, bz2 or xz compressed one"
