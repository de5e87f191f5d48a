"""Read a W&B `.wandb` file without uploading it: what an offline run recorded.

    python -m distnn.monitor.wandb_reader runs/NAME/wandb/offline-run-*/   # history as JSON lines

wandb 0.31 ships no reader. The file is the leveldb log format: a 7-byte header (`:W&B`, a
2-byte magic, a version byte), then 32 KiB blocks of chunks, each with a 7-byte header — CRC32
of the type byte and the data (little-endian u32), the data length (u16) and the type (1: a
full record, 2: first, 3: middle, 4: last piece of one) — a block's tail too short for a header
is zero padding. Each record is a `wandb.proto.wandb_internal_pb2.Record`; history rows are
`record.history.item` (key, value_json).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptFile(ValueError):
    pass


def chunks(data: bytes) -> Iterator[bytes]:
    """Whole records' payloads from the leveldb-log framed bytes of a `.wandb` file. A torn
    last record (a killed process) ends the stream; a bad checksum elsewhere raises."""
    if not data.startswith(b":W&B"):
        raise CorruptFile("not a .wandb file (no :W&B header)")
    pos, pending = HEADER, None
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero padding to the block end
            pos += left
            continue
        body = data[pos + HEADER : pos + HEADER + length]
        if len(body) < length:
            return  # torn tail
        if zlib.crc32(bytes([kind]) + body) != crc:
            raise CorruptFile(f"checksum mismatch at byte {pos}")
        pos += HEADER + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += body
            if kind == LAST:
                yield pending
                pending = None
        else:
            raise CorruptFile(f"chunk type {kind} out of order at byte {pos}")


def _wandb_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.wandb"))
        if not found:
            raise FileNotFoundError(f"no .wandb file in {path}")
        return found[0]
    return path


def records(path: str | Path) -> Iterator[Any]:
    """Every `Record` of a `.wandb` file (or of the offline run directory holding one)."""
    from wandb.proto import wandb_internal_pb2

    for body in chunks(_wandb_file(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(body)
        yield record


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _put(out: dict[str, Any], item: Any) -> None:
    """Set an item's value; nested keys (an image's fields) become nested dicts."""
    *parents, leaf = [item.key] if item.key else list(item.nested_key)
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = json.loads(item.value_json)


def history(path: str | Path) -> list[dict[str, Any]]:
    """The logged rows, in order: {key: value} with `_step`, `_runtime`, `_timestamp`; media
    (the image grid) as nested dicts such as {"_type": "image-file", "path": ...}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            rows.append(row)
    return rows


def run_info(path: str | Path) -> dict[str, Any]:
    """The run record: id, project, name, group, tags, whether it resumed; and its config."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            config: dict[str, Any] = {}
            for item in run.config.update:
                _put(config, item)
            return {
                "id": run.run_id,
                "project": run.project,
                "entity": run.entity,
                "name": run.display_name,
                "group": run.run_group,
                "tags": list(run.tags),
                "notes": run.notes,
                "resume": run.resume,
                "config": config,
            }
    raise CorruptFile(f"{path}: no run record")


def summary(path: str | Path) -> dict[str, Any]:
    """The summary as the run left it (later updates win)."""
    out: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                _put(out, item)
            for item in record.summary.remove:
                out.pop(_key(item), None)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m distnn.monitor.wandb_reader",
        description="Print an offline W&B run's history rows as JSON lines.",
    )
    p.add_argument("paths", nargs="+", help=".wandb files or offline-run-* directories")
    p.add_argument("--summary", action="store_true", help="print the summary instead")
    args = p.parse_args(argv)
    for path in args.paths:
        if args.summary:
            print(json.dumps(summary(path)))
            continue
        for row in history(path):
            print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
