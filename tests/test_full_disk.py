"""A full disk while writing: one line naming the file and the cause, no partial temporary
file left to keep the disk full, and the previous version (checkpoint, `latest`, summary) in
place. Each test fills a small tmpfs of its own (tests run as root; skipped where mounting is
not allowed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from distnn import checkpoint, config, fsio, safeload
from distnn.data import manifest
from distnn.data.shard import shard
from distnn.errors import UserError
from distnn.monitor import Run
from distnn.parallel.env import Env
from distnn.train import train
from tests.conftest import FAST, run_cli, torchrun, write_imagefolder

FULL = "no space left on device"


@pytest.fixture
def disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system to fill")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on `disk`."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return filler


def leftovers(directory: Path) -> list[str]:
    """Temporary files and directories, as a failed write would leave them."""
    return sorted(p.name for p in directory.rglob(".*.tmp"))


# tutorial_cnn: 4 steps an epoch, checkpoints of 1.2 MB.
RUN = [*FAST, "model.name=tutorial_cnn", "data.synthetic_train=64", "data.synthetic_val=32",
       "train.batch_size=16"]  # fmt: skip


def test_full_disk_at_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(disk, capsys):
    args = [f"run.dir={disk}", "run.name=r", *RUN]
    train(config.load(None, [*args, "train.epochs=1"]))
    ckpts = disk / "r" / "checkpoints"
    filler = fill(disk, leave=256 * 1024)  # room for the logs, not for a checkpoint

    r = run_cli("-m", "distnn.train", *args, "train.epochs=2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines() == [f"error: cannot write {ckpts}/step_00000008.pt: {FULL}"]
    assert leftovers(disk) == []
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "latest", "step_00000004.pt"]
    assert (ckpts / "latest").read_text() == "step_00000004.pt\n"

    filler.unlink()  # space freed: the same command continues from step 4
    capsys.readouterr()
    summary = train(config.load(None, [*args, "train.epochs=2"]))
    assert f"resumed at step 4 from {ckpts}/step_00000004.pt" in capsys.readouterr().out
    assert summary["steps"] == 8
    assert (ckpts / "latest").read_text() == "step_00000008.pt\n"


@pytest.mark.parametrize(
    "write",
    [
        # config.yaml, summary.json, metrics.jsonl rewound, latest, wandb_id
        lambda path, data: fsio.write_text(path, str(data)),
        manifest.write_json,
        # torch.save raises a RuntimeError from the OSError
        lambda path, data: checkpoint.atomic_save(torch.tensor(data), path),
    ],
    ids=["text", "manifest", "torch"],
)
def test_an_atomic_write_that_does_not_fit_keeps_the_old_file(disk, write: Callable):
    path = disk / "file"
    write(path, [0])
    before = path.read_bytes()
    fill(disk, leave=64 * 1024)
    with pytest.raises(UserError) as e:
        write(path, list(range(200_000)))  # over 1 MB in each format
    assert str(e.value) == f"cannot write {path}: {FULL}"
    assert path.read_bytes() == before
    assert leftovers(disk) == []


def test_full_disk_while_logging_is_one_line(disk, make_cfg):
    cfg = make_cfg(f"run.dir={disk}", "log.tensorboard=false")
    run = Run(cfg, Env(), total_steps=4)
    fill(disk, leave=0)
    with pytest.raises(UserError) as e:
        run.log({"step": 1, "loss": 1.0})
    assert str(e.value) == f"cannot write {cfg.run_dir}/metrics.jsonl: {FULL}"
    with pytest.raises(UserError) as e:
        run.summary({"steps": 1})
    assert str(e.value) == f"cannot write {cfg.run_dir}/summary.json: {FULL}"
    run.close()  # quietly drops the record that did not fit: log() has said why
    assert leftovers(disk) == []


def test_full_disk_in_a_directory_checkpoint_keeps_the_last_one(disk):
    """The path ZeRO takes in one process; its shards written by torch's own C++ writer,
    whose error has no errno."""
    ckpt = checkpoint.Manager(config.load(None, []).ckpt, disk, writes=True)

    def shards(numel: int) -> Callable[[Path], None]:
        return lambda directory: torch.save(torch.zeros(numel), str(directory / "shard.pt"))

    ds = {"format": "deepspeed"}  # a directory of DeepSpeed's shards
    ckpt.save({"strategy": ds, "step": 1}, 1, save_shards=shards(1000))
    with pytest.raises(UserError) as e:
        ckpt.save({"strategy": ds, "step": 2}, 2, save_shards=shards(1 << 20))  # 4 MiB
    assert str(e.value) == f"cannot write {disk}/checkpoints/step_00000002: {FULL}"
    assert leftovers(disk) == []
    assert (disk / "checkpoints" / "latest").read_text() == "step_00000001\n"
    assert checkpoint.load_file(disk, safeload.Trust("", own=disk))["step"] == 1


def test_full_disk_while_sharding_drops_the_partial_shard(disk, tmp_path):
    src = tmp_path / "src"
    write_imagefolder(src, per_class=(6, 2), size=64)
    out = disk / "shards"
    out.mkdir()
    fill(disk, leave=8 * 1024)
    with pytest.raises(UserError) as e:
        shard("imagefolder", src, out)
    assert str(e.value) == f"cannot write {out}/train-000000.tar: {FULL}"
    assert leftovers(disk) == []


@pytest.mark.timeout(120)
def test_a_deepspeed_shard_failing_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """ZeRO-2 on 2 processes, rank 1's shard failing alone: rank 0, which wrote its files,
    must not wait for it until the timeout; the checkpoint before stays the latest."""
    pytest.importorskip("deepspeed")
    r = torchrun(2, "tests/scripts/deepspeed_shard_fails.py", f"run.dir={tmp_path}", *RUN,
                 "train.max_steps=4", "ckpt.every_steps=2", "ckpt.epoch_end=false",
                 "precision=fp32", "strategy.name=deepspeed", "dist.timeout_s=60",
                 env={"FAIL_STEP": "4"}, timeout=100)  # fmt: skip
    ckpts = tmp_path / "default" / "checkpoints"
    line = f"error: cannot write {ckpts}/step_00000004: {FULL}"
    assert [s for s in r.stderr.splitlines() if s.startswith("error:")] == [line, line], r.stderr
    raw = ("OSError", "RuntimeError", "DistBackendError")  # (torchrun's own ChildFailedError)
    assert not any(name in r.stderr for name in raw), r.stderr[-3000:]
    assert leftovers(tmp_path) == []
    assert (ckpts / "latest").read_text() == "step_00000002\n"
