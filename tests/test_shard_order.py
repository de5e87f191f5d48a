"""Shards in global-batch order: every global batch holds the same decoded, augmented samples
whatever the world size and data.workers (through the real loaders and DataLoader workers),
resume skips to the batch, and a checkpoint resumed at another world size says it continues."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from distnn import data, resume
from distnn.data import shard as sharder
from distnn.data.tars import scan_shard, stream_shard
from distnn.parallel.env import Env
from tests.conftest import write_cifar

GLOBAL = 12  # world 1 × 12, world 2 × 6, world 3 × 4
EPOCHS = (0, 1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """100 train samples in shards of 30, 30, 30, 10 made by the sharder's CLI entry; the same
    tars without their sidecar index (another tool's plain tars) and gzip-compressed."""
    root = tmp_path_factory.mktemp("order")
    write_cifar(root / "src", "cifar10", per_batch=20, seed=4)
    out = root / "out"
    sharder.main(["cifar10", str(root / "src"), str(out), "--max-count=30"])
    doc = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in doc["splits"]["train"]["shards"]] == [30, 30, 30, 10]
    variants = {"indexed": out}
    for name in ("plain", "gzip"):
        d = root / name
        d.mkdir()
        variant = json.loads(json.dumps(doc))
        for split in variant["splits"].values():
            for s in split["shards"]:
                tar = (out / s["file"]).read_bytes()
                for key in ("index", "sha256", "bytes"):
                    s.pop(key, None)
                if name == "gzip":
                    s["file"] += ".gz"
                    (d / s["file"]).write_bytes(gzip.compress(tar))
                else:
                    (d / s["file"]).write_bytes(tar)
        (d / "manifest.json").write_text(json.dumps(variant))
        variants[name] = d
    return variants


def loaders(make_cfg, root, world, rank, workers, *extra):
    cfg = make_cfg("data.source=shards", f"data.root={root}", f"train.global_batch={GLOBAL}",
                   f"data.workers={workers}", "train.seed=5", *extra)  # fmt: skip
    return data.build(cfg, Env(rank=rank, world_size=world))


def epochs(loaders, start=0):
    """Batches (images, labels, global indices) of EPOCHS, one list across the boundary."""
    out = []
    for e in EPOCHS:
        loaders.train_order.set_epoch(e, start if e == EPOCHS[-1] else 0)
        specs = [items for _, items in loaders.train_order]
        loaders.train_order.set_epoch(e, start if e == EPOCHS[-1] else 0)
        batches = list(loaders.train)
        assert len(batches) == len(specs)
        out += [(x, y, g) for (x, y), g in zip(batches, specs, strict=True)]
    return out


def merge(per_rank: list[list]) -> list[tuple]:
    """Each rank holds positions rank, rank + world, … of a global batch: put them back."""
    world, merged = len(per_rank), []
    for t in range(len(per_rank[0])):
        parts = [per_rank[r][t] for r in range(world)]
        x = torch.empty(GLOBAL, *parts[0][0].shape[1:], dtype=parts[0][0].dtype)
        y = torch.empty(GLOBAL, dtype=torch.int64)
        g = torch.empty(GLOBAL, dtype=torch.int64)
        for r, (xr, yr, gr) in enumerate(parts):
            assert len(xr) == len(yr) == len(gr) == GLOBAL // world
            x[r::world], y[r::world], g[r::world] = xr, yr, torch.from_numpy(gr)
        merged.append((x, y, g))
    return merged


def assert_same(got, want):
    assert len(got) == len(want)
    for (x, y, g), (wx, wy, wg) in zip(got, want, strict=True):
        assert g.tolist() == wg.tolist()
        assert torch.equal(y, wy) and torch.equal(x, wx)


@pytest.mark.timeout(240)
def test_global_batches_do_not_depend_on_world_size_or_workers(make_cfg, shards):
    one = loaders(make_cfg, shards["indexed"], 1, 0, 0)
    assert one.steps_per_epoch == 100 // GLOBAL == 8
    want = merge([epochs(one)])
    assert len(want) == 16  # two epochs, the boundary between batches 7 and 8
    assert want[0][2].tolist() != want[8][2].tolist()  # another permutation each epoch
    for e in range(len(EPOCHS)):
        seen = torch.cat([g for _, _, g in want[8 * e : 8 * (e + 1)]]).tolist()
        assert len(set(seen)) == len(seen) == 96  # no sample twice in an epoch
    # The samples and augmented pixels of every global batch, whoever reads them.
    for world in (1, 2, 3):
        for workers in (0, 1, 2):
            ranks = [loaders(make_cfg, shards["indexed"], world, r, workers) for r in range(world)]
            assert {lo.steps_per_epoch for lo in ranks} == {8}
            assert_same(merge([epochs(lo) for lo in ranks]), want)
            # Resume at batch k of epoch 1: the rest of the uninterrupted stream, sliced.
            for lo in ranks:
                lo.train_order.set_epoch(1, 3)
            tail = merge([epochs(lo, start=3)[8:] for lo in ranks])
            assert_same(tail, want[8 + 3 :])
    # Another tool's plain tars (offsets from their headers) and gzip-compressed ones (parsed by
    # webdataset) hold the same global batches.
    for name in ("plain", "gzip"):
        ranks = [loaders(make_cfg, shards[name], 2, r, 2) for r in range(2)]
        assert_same(merge([epochs(lo) for lo in ranks]), want)


def test_accumulation_keeps_global_batches(make_cfg, shards):
    """accum_steps 2: optimizer steps of 24 samples in global micro-batches of 12, the same at
    world 1 and 3 (12 and 3 × 4 per micro-batch), the same 4-sample tail left out."""
    one = loaders(make_cfg, shards["indexed"], 1, 0, 0, "train.accum_steps=2",
                  f"train.global_batch={2 * GLOBAL}")  # fmt: skip
    three = [
        loaders(make_cfg, shards["indexed"], 3, r, 1, "train.accum_steps=2",
                f"train.global_batch={2 * GLOBAL}")
        for r in range(3)
    ]  # fmt: skip
    assert one.steps_per_epoch == 100 // (2 * GLOBAL) * 2 == 8
    assert_same(merge([epochs(lo) for lo in three]), merge([epochs(one)]))


def test_resume_notes_for_shards(make_cfg):
    state = {
        "world_size": 2,
        "rng": [None, None],
        "config": {"train": {"batch_size": 6, "accum_steps": 1}, "data": {"workers": 2}},
    }
    cfg = make_cfg("data.source=shards", "data.root=x", "train.batch_size=12", "data.workers=0")
    [note] = resume.resume_notes(state, cfg, 1)
    assert note.startswith("note: the checkpoint was written by 2 processes, this run has 1: the")
    assert "same global batches of 12 follow, so it continues the uninterrupted run" in note
    # Another number of workers at the same world size changes nothing.
    assert resume.resume_notes(state, make_cfg("data.source=shards", "train.batch_size=6",
                                                   "data.workers=1"), 2) == []  # fmt: skip
    [note] = resume.resume_notes(state, make_cfg("data.source=shards", "train.batch_size=8"), 1)
    assert "not exactly as an uninterrupted run (the global batch changes from 12 to 8)" in note


def test_header_scan_reads_what_webdataset_reads(tmp_path):
    """Another tool's tars are read by offset from their headers: the same samples and bytes as
    webdataset's own parse for ustar, GNU and PAX headers (long and non-ASCII names, folders,
    metadata files); a truncated tar keeps the samples before the damage; a compressed one is
    left to webdataset."""
    rng = np.random.default_rng(0)
    names = []
    for i in range(24):
        key = [f"s{i:03d}", f"dir/s{i:03d}", "a/" + "x" * 120 + f"/s{i}", f"ü{i}/näme"][i % 4]
        names += [f"{key}.cls", f"{key}.JPG", f"{key}.json"] + (["__meta__", f"d{i}/"] * (i == 8))
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name in names:
                if fmt == tarfile.USTAR_FORMAT and ("ü" in name or "xxx" in name):
                    continue  # ustar holds neither
                info, data = tarfile.TarInfo(name.rstrip("/")), rng.bytes(rng.integers(0, 2000))
                if name.endswith("/"):
                    info.type, data = tarfile.DIRTYPE, b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        whole = path.read_bytes()
        with tarfile.open(path) as tar:
            files = [m for m in tar.getmembers() if m.size > 1]
        middle = files[len(files) // 2]
        for cut in (len(whole), middle.offset_data + middle.size // 2):  # whole, cut in a file
            path.write_bytes(whole[:cut])
            (scanned, why), (streamed, stream_why) = scan_shard(path), stream_shard(path)
            assert (why is None) == (stream_why is None) == (cut == len(whole))
            with open(path, "rb") as f:
                got = [{k: v if k == "__key__" else os.pread(f.fileno(), v[1], v[0])
                        for k, v in sample.items()} for sample in scanned]  # fmt: skip
            want = [{k: v for k, v in sample.items() if k != "__url__"} for sample in streamed]
            # webdataset also drops the last whole sample before a damaged file; the scan keeps it.
            assert got[: len(want)] == want and len(got) - len(want) <= (why is not None)
            assert len(want) == (24 if fmt != tarfile.USTAR_FORMAT else 12) or why
        path.write_bytes(gzip.compress(whole))
        assert scan_shard(path) is None
