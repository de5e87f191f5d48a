"""A predictions file, written in parts: each rank writes each of its parts whole (a rename, or
one object put), rank 0 merges them in the dataset's order, and a rerun with the same
arguments skips the parts already there.

Rows, in every format: `key` (the sample's file, shard member or index), `label` (its true
class, where known), `class_1`, `prob_1`, … `class_K`, `prob_K` (top-k), `error` (why an
unreadable sample has no prediction; data.on_error=skip), and with --save-probs `probs` (every
class's probability, in the checkpoint's class order; a JSON array in CSV).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from distnn import storage
from distnn.errors import UserError

Row = dict[str, Any]


def rows(
    log_probs: torch.Tensor, labels: list[int], keys: list[str], indices: list[int],
    classes: Sequence[str], topk: int, save_probs: bool,
) -> list[Row]:  # fmt: skip
    """One row per sample of a batch (its index kept for the merge)."""
    probs = log_probs.exp().cpu()
    top_p, top_i = probs.topk(min(topk, len(classes)), dim=1)
    out = []
    for j, (i, p, c) in enumerate(zip(indices, top_p.tolist(), top_i.tolist(), strict=True)):
        label = classes[labels[j]] if labels[j] >= 0 else None
        row: Row = {"index": i, "key": keys[j], "label": label}
        for k, (name, prob) in enumerate(zip(c, p, strict=True), 1):
            row[f"class_{k}"], row[f"prob_{k}"] = classes[name], prob
        row["error"] = None
        if save_probs:
            row["probs"] = probs[j].tolist()
        out.append(row)
    return out


def failed(index: int, key: str, label: int, reason: str, classes: Sequence[str]) -> Row:
    """The row of a sample that could not be read."""
    return {"index": index, "key": key, "label": classes[label] if label >= 0 else None,
            "error": reason}  # fmt: skip


def columns(topk: int, save_probs: bool) -> list[str]:
    top = [f"{name}_{k}" for k in range(1, topk + 1) for name in ("class", "prob")]
    return ["key", "label", *top, "error", *(["probs"] if save_probs else [])]


def _csv(table: list[Row], names: list[str]) -> bytes:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(names)
    for row in table:
        cells = [row.get(n) for n in names]
        w.writerow(["" if v is None else json.dumps(v) if isinstance(v, list) else repr(v)
                    if isinstance(v, float) else v for v in cells])  # fmt: skip
    return out.getvalue().encode()


def _jsonl(table: list[Row], names: list[str]) -> bytes:
    return "".join(json.dumps({n: row.get(n) for n in names}) + "\n" for row in table).encode()


def _parquet(table: list[Row], names: list[str]) -> bytes:
    import pyarrow as pa  # only for this format
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{n: row.get(n) for n in names} for row in table]), out)
    return out.getvalue()


FORMATS: dict[str, Callable[[list[Row], list[str]], bytes]] = {
    ".csv": _csv, ".jsonl": _jsonl, ".parquet": _parquet,
}  # fmt: skip


def format_of(output: str) -> Callable[[list[Row], list[str]], bytes]:
    suffix = Path(output.split("?", 1)[0]).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"--output {output!r}: name a {', '.join(FORMATS)} file")
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise UserError("--output *.parquet needs pyarrow: pip install 'distnn[parquet]'")
    return FORMATS[suffix]


def _store(url: str) -> storage.Remote:
    root = url if storage.is_url(url) else Path(url).resolve().as_uri()
    return storage.Remote(root, {}, retry_s=120, setting="--output")


class Parts:
    """The parts of one predictions file, beside it (`OUTPUT.parts/`: a directory, or objects
    under that prefix for an s3:// or http(s):// output), and the plan they were made by."""

    def __init__(self, output: str) -> None:
        self.output = output.rstrip("/")
        parent, _, self.name = self.output.rpartition("/")
        self.parent = _store(parent or ".")
        self.store = _store(f"{self.output}.parts")

    def check_plan(self, plan: dict[str, Any], write: bool) -> None:
        """Find the plan equal to the one the parts were made by, or (`write`) write it."""
        if self.store.size("plan.json") is None:
            if write:
                self.store.write("plan.json", json.dumps(plan, indent=1).encode())
            return
        was = json.loads(self.store.read("plan.json"))
        changed = [k for k in plan if was.get(k) != plan[k]]
        if changed:
            k = changed[0]
            raise UserError(
                f"{self.output}.parts holds parts of another prediction ({k}: {was.get(k)!r} "
                f"then, {plan[k]!r} now): rerun with the same arguments, or remove it"
            )

    def done(self, count: int) -> frozenset[int]:
        return frozenset(p for p in range(count) if self.store.size(_part(p)) is not None)

    def write(self, part: int, table: list[Row]) -> None:
        self.store.write(_part(part), _jsonl(table, list({k: 0 for r in table for k in r})))

    def merge(self, count: int, names: list[str]) -> int:
        """The output file from parts 0..count-1, in the dataset's order; its row count."""
        fmt = format_of(self.output)
        table: list[Row] = []
        for p in range(count):
            part = [json.loads(line) for line in self.store.read(_part(p)).decode().splitlines()]
            table += sorted(part, key=lambda r: r["index"])
        self.parent.write(self.name, fmt(table, names))
        return len(table)


def _part(p: int) -> str:
    return f"part_{p:06d}.jsonl"


def fingerprint(keys: Sequence[str]) -> str:
    """What a rerun must find the same: the samples, by key, in order."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
