"""Files from elsewhere that would hang or exhaust the loader: tar headers that do not move a
scan on, decompression bombs (a 12000 × 12000 PNG of ~140 KB, a tar.gz inflating to 1 GB), a
worker stuck on a read. Each is a counted sample error or one line, in bounded memory."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distnn import data, predict
from distnn.data import shard as sharder
from distnn.data.errors import SampleError
from distnn.data.sources import decode
from distnn.data.tars import scan_shard, stream_shard
from distnn.errors import UserError
from distnn.monitor import read_metrics
from distnn.parallel.env import Env
from distnn.train import main
from tests.conftest import FAST, ROOT, one_line_error, write_imagefolder

# How far above a clean run's peak RSS (~850 MiB here, 510 of it torch's import) a 1-epoch
# run over hostile inputs may go: holding the bomb's 1 GB, or decoding the 12000 × 12000 image
# (144 M pixels, 432 MB as RGB), goes well past it.
HEADROOM_MIB = 200
RUN = [*FAST, "data.image_size=16", "train.batch_size=4", "train.epochs=1", "train.log_every=1"]


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT)


def member(name: str, payload: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return header(name, len(payload), kind) + payload + bytes(-len(payload) % 512)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def samples(keys: list[str], label: int = 1) -> bytes:
    """Members of good samples: `key.cls` and a small `key.png` each."""
    rng = np.random.default_rng(len(keys))
    pixels = lambda: rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # noqa: E731
    return b"".join(member(f"{k}.cls", str(label).encode()) + member(f"{k}.png", png(pixels()))
                    for k in keys)  # fmt: skip


def good_shard() -> bytes:
    """A plain tar of 12 good samples, as another tool writes it (no index)."""
    return samples([f"g{i:02d}" for i in range(12)]) + bytes(1024)


def with_size_field(block: bytes, field: bytes) -> bytes:
    """A header block whose size field says `field`, its checksum made right again."""
    block = block[:124] + field.ljust(12, b"\0") + block[136:148] + b" " * 8 + block[156:]
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


# Headers placed between two good samples and two more: each must end the scan there.
HOSTILE = {
    "zero-length PAX record": member("PaxHeader/s2", b"0 ", tarfile.XHDTYPE),
    "PAX record shorter than its length field": member("PaxHeader/s2", b"2 path=x\n", b"x"),
    "negative PAX record length": member("PaxHeader/s2", b"-9 path=x\n", tarfile.XHDTYPE),
    "PAX record past its data": member("PaxHeader/s2", b"99 path=x\n", tarfile.XHDTYPE),
    "negative size in PAX": member("PaxHeader/s2", b"14 size=-1024\n", tarfile.XHDTYPE),
    "negative size field": with_size_field(header("s2.cls", 0), b"-1000"),
    "16 MB PAX header": header("PaxHeader/s2", 16 << 20, tarfile.XHDTYPE) + bytes(16 << 20),
    "bad checksum": header("s2.cls", 1)[:148] + b"0000000\0" + header("s2.cls", 1)[156:],
}


def hostile_tar(bad: bytes) -> bytes:
    return samples(["s0", "s1"]) + bad + samples(["s2", "s3"]) + bytes(1024)


@pytest.mark.timeout(20)  # the old scanner looped forever on a zero-length PAX record
@pytest.mark.parametrize("case", list(HOSTILE))
def test_scan_and_stream_stop_at_a_header_that_does_not_advance(tmp_path, case):
    whole = hostile_tar(HOSTILE[case])
    (tmp_path / "a.tar").write_bytes(whole)
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(whole))
    scanned = scan_shard(tmp_path / "a.tar")
    assert scanned is not None
    for found, why in (scanned, stream_shard(tmp_path / "a.tar.gz")):
        # s0 is whole; s1 may still be open when the damage is met; nothing after it is kept.
        assert [s["__key__"] for s in found] in (["s0"], ["s0", "s1"]), (case, found)
        assert why is not None and "tar unreadable after" in why, why


def write_manifest(root: Path, train: dict[str, int], val: dict[str, int]) -> None:
    doc = {"format": "distnn-shards", "version": 1, "classes": ["a", "b", "c"],
           "splits": {split: {"shards": [{"file": f, "count": n} for f, n in files.items()]}
                      for split, files in (("train", train), ("val", val))}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A valid 12000 × 12000 grayscale PNG: 140 KB on disk, 432 MB decoded to RGB."""
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile_shards(tmp_path_factory, big_png) -> Path:
    """Plain tars without an index (as another tool writes them) and a tar.gz, each with a
    manifest: `good` (12 samples), `pax` (2 good, a zero-length PAX record, 2 more), `png` (the
    12000 × 12000 image, then 3 good), `bomb` (a tar.gz whose first member is 1 GB of zeros,
    written through gzip so nothing here holds it, then 3 good; 4.3 MB, ~3 s to write). `all/` lists
    them all for training; `<name>/` each alone with `good`."""
    root = tmp_path_factory.mktemp("hostile")
    shards = {
        "good.tar": good_shard(),
        "pax.tar": hostile_tar(HOSTILE["zero-length PAX record"]),
        "png.tar": member("p0.cls", b"1") + member("p0.png", big_png)
        + samples(["p1", "p2", "p3"]) + bytes(1024),
    }  # fmt: skip
    for name, whole in shards.items():
        (root / name).write_bytes(whole)
    with gzip.open(root / "bomb.tar.gz", "wb", compresslevel=1) as gz:
        gz.write(header("b0.png", 10**9))
        for _ in range(1000):
            gz.write(bytes(10**6))
        gz.write(member("b0.cls", b"1") + samples(["b1", "b2", "b3"]) + bytes(1024))
    counts = {"good.tar": 12, "pax.tar": 4, "png.tar": 4, "bomb.tar.gz": 4}
    for name, count in [("all", None), *list(counts.items())[1:]]:
        d = root / name.split(".")[0]
        d.mkdir()
        listed = counts if count is None else {"good.tar": 12, name: count}
        for f in listed:
            (d / f).symlink_to(root / f)
        write_manifest(d, listed, {"good.tar": 12})
    return root


def run_measured(*argv: str, timeout: float = 120) -> tuple[int, str, float]:
    """`python -m distnn.train ARGV` in a fresh process: exit code, stderr and peak RSS in MiB
    (wait4's, which covers the processes it waited for too)."""
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-m", "distnn.train", *argv], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        deadline = time.monotonic() + timeout
        while (done := os.wait4(p.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                p.kill()
                done = os.wait4(p.pid, 0)
                break
            time.sleep(0.1)
        p.returncode = os.waitstatus_to_exitcode(done[1])  # reaped here, not by Popen
        err.seek(0)
        return p.returncode, err.read().decode(), done[2].ru_maxrss / 1024


@pytest.fixture(scope="module")
def clean_peak(tmp_path_factory) -> float:
    """The peak RSS (MiB) of the runs below over one good shard."""
    root = tmp_path_factory.mktemp("clean")
    (root / "good.tar").write_bytes(good_shard())
    write_manifest(root, {"good.tar": 12}, {"good.tar": 12})
    rc, err, peak = run_measured(f"run.dir={root}", *RUN, "data.source=shards", f"data.root={root}")
    assert rc == 0, err[-3000:]
    print(f"clean run: peak RSS {peak:.0f} MiB")
    return peak


def data_errors(run_dir: Path) -> int:
    return [r for r in read_metrics(run_dir) if "loss" in r][-1]["data_errors"]


@pytest.mark.timeout(120)
def test_hostile_shards_are_counted_in_bounded_memory(tmp_path, hostile_shards, clean_peak):
    run = [f"run.dir={tmp_path}", *RUN, "data.source=shards", "train.seed=1"]
    rc, err, peak = run_measured(*run, f"data.root={hostile_shards / 'all'}", "run.name=skip")
    print(f"hostile shards: peak RSS {peak:.0f} MiB")
    assert rc == 0, err[-3000:]
    # 24 samples, 6 batches of 4; unreadable: pax's 2 after the damage and its s1 (open when
    # the damage came), the big image, the bomb and the 3 after it.
    assert data_errors(tmp_path / "skip") == 8
    assert peak < clean_peak + HEADROOM_MIB


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("shards", "says"),
    [("pax", "bad PAX record"), ("png", "12000 × 12000 = 144,000,000 pixels, over "
     "data.max_pixels=67,108,864"), ("bomb", "b0.png: the shard inflates past "
     "data.max_shard_bytes=536,870,912")],
)  # fmt: skip
def test_hostile_shard_with_raise_is_one_line(tmp_path, hostile_shards, capfd, shards, says):
    line = one_line_error(main, [f"run.dir={tmp_path}", *RUN, "data.source=shards",
                                 f"data.root={hostile_shards / shards}", "data.on_error=raise",
                                 "train.seed=1"], capfd)  # fmt: skip
    assert says in line and f"shard {shards}.tar" in line, line


@pytest.mark.timeout(120)
def test_big_image_in_an_imagefolder_and_predict(tmp_path, big_png, clean_peak, capfd):
    root = tmp_path / "data"
    write_imagefolder(root, per_class=(5, 1), size=12)  # 15 + 1 images: 4 batches read all
    huge = root / "train" / "cat" / "huge.png"
    huge.write_bytes(big_png)
    run = [f"run.dir={tmp_path}", *RUN, "data.source=imagefolder", f"data.root={root}"]
    rc, err, peak = run_measured(*run, "run.name=skip")
    with capfd.disabled():
        print(f"imagefolder: peak RSS {peak:.0f} MiB")
    assert rc == 0, err[-3000:]
    assert data_errors(tmp_path / "skip") == 1 and peak < clean_peak + HEADROOM_MIB
    line = one_line_error(main, [*run, "run.name=raise", "data.on_error=raise"], capfd)
    assert str(huge) in line and "12000 × 12000" in line and "data.max_pixels" in line
    # Prediction reads with the default limit.
    line = one_line_error(predict.main, ["--checkpoint", str(tmp_path / "skip"), str(huge),
                                         "data.on_error=raise"], capfd)  # fmt: skip
    assert str(huge) in line and "12000 × 12000" in line and "data.max_pixels" in line


def test_the_sharder_skips_a_bomb_and_verify_counts_from_headers(tmp_path, big_png, make_cfg):
    """The sharder reads the header before decoding (a 12000 × 12000 PNG is skipped, named in
    the manifest); data.verify counts each shard's samples without reading their data."""
    write_imagefolder(tmp_path / "src", per_class=(4, 1), size=12)
    (tmp_path / "src" / "train" / "cat" / "huge.png").write_bytes(big_png)
    sharder.shard("imagefolder", tmp_path / "src", tmp_path / "out", max_count=6)
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (skipped,) = doc["skipped"]
    assert skipped["source"].endswith("huge.png") and "data.max_pixels" in skipped["reason"]
    cfg = make_cfg("data.source=shards", f"data.root={tmp_path / 'out'}", "data.verify=true",
                   "train.batch_size=2")  # fmt: skip
    loaders = data.build(cfg, Env())
    assert loaders.train_size == doc["splits"]["train"]["count"] == 12


def test_max_pixels_is_the_limit_that_applies(monkeypatch):
    image = png(np.zeros((50, 50, 3), dtype=np.uint8))
    with pytest.raises(SampleError, match=r"50 × 50 = 2,500 pixels, over data.max_pixels=2,499"):
        decode(image, max_pixels=2499)
    # PIL refuses images above twice its own limit, and warns above it: not ours to follow.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode(image).shape == (3, 50, 50)
    assert Image.MAX_IMAGE_PIXELS == 1000


def stuck_shards(root: Path) -> Path:
    """Our sharder's indexed shards whose train-000000 index is a named pipe no one writes: a
    worker that opens it blocks in the kernel, as on a hung network file system."""
    write_imagefolder(root / "src", per_class=(4, 1), size=12)
    sharder.shard("imagefolder", root / "src", root / "out", max_count=6)
    fifo = root / "out" / "train-000000.idx.json"
    fifo.unlink()
    os.mkfifo(fifo)
    return fifo


def release(fifo: Path) -> None:
    """Let the stuck reader go: a writer opens the pipe and leaves (the read sees its end)."""
    with contextlib.suppress(OSError):  # ENXIO: no reader is left
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.timeout(60)
def test_stuck_worker_ends_the_run_naming_the_shard(tmp_path, capfd):
    fifo = stuck_shards(tmp_path)
    start = time.monotonic()
    try:
        line = one_line_error(main, [f"run.dir={tmp_path / 'runs'}", *RUN, "data.workers=1",
                                     "data.source=shards", f"data.root={tmp_path / 'out'}",
                                     "data.timeout_s=2"], capfd)  # fmt: skip
    finally:
        release(fifo)
    assert "train-000000.tar" in line and "data.timeout_s" in line, line
    assert time.monotonic() - start < 40


class Blocking(torch.utils.data.Dataset):
    """A user's dataset whose reads after sample 0 (which the build reads in the main process)
    block on a named pipe."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i > 0:
            self.fifo.read_bytes()
        return torch.zeros(3, 8, 8, dtype=torch.uint8), 0


@pytest.mark.timeout(60)
def test_stuck_worker_of_a_python_dataset_names_the_source(tmp_path, make_cfg):
    fifo = tmp_path / "pipe"
    good = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)] * 8
    cfg = make_cfg("data.workers=1", "data.timeout_s=1", "train.batch_size=4",
                   "model.num_classes=2", "data.image_size=8")  # fmt: skip
    os.mkfifo(fifo)
    loaders = data.build(cfg, Env(), datasets=(Blocking(fifo), good))
    try:
        with pytest.raises(UserError) as info:
            list(loaders.train)
    finally:
        release(fifo)
    line = str(info.value)
    assert "data.source=python (sample " in line and "data.timeout_s" in line


@pytest.mark.parametrize("key", ["file", "index"])
@pytest.mark.parametrize("name", ["../escape.json", ".ledger", "a$(touch x).tar", "a b.tar"])
def test_a_manifest_naming_what_a_cache_or_shell_reads_specially_is_refused(
    tmp_path, digits_shards, key, name
):
    """A remote shard's names become files in the node's cache (beside its dot-files) and go
    into pipe: commands: `../x`, `.ledger`, `$(...)` and spaces are refused in one line."""
    from distnn.data import manifest as mf

    doc = json.loads((digits_shards / "manifest.json").read_text())
    doc["splits"]["train"]["shards"][0][key] = name
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"split 'train' shard 0 has a bad file .*letters, digits"):
        mf.load(tmp_path)
