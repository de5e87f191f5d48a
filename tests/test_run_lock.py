"""A run directory belongs to one job (runlock.py), and every temporary file is the writer's
own (fsio.py)."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import FAST, ROOT, logged_steps

from distnn import checkpoint_files, fsio, runlock

GATE = '''
import os, time
import numpy as np
from torch.utils.data import Dataset

class Gated(Dataset):
    """Synthetic images; once the file `GATE_HOLD` names exists (the run's first checkpoint),
    reads wait for the one `GATE_RELEASE` names (60 s at most in all): the job is alive,
    holding its run directory with a checkpoint and metrics in it, as long as the test needs."""
    classes = ["a", "b"]

    def __init__(self, split, root, n=64):
        self.n, self.deadline = n, time.monotonic() + 60

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        while (os.path.exists(os.environ["GATE_HOLD"])
               and not os.path.exists(os.environ["GATE_RELEASE"])
               and time.monotonic() < self.deadline):
            time.sleep(0.05)
        rng = np.random.default_rng(i)
        return rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), i % 2
'''

STEPS = 8


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distnn.train", *FAST, "model.name=tutorial_cnn",
            "data.source=gate:Gated", "data.image_size=16", "train.batch_size=8",
            "train.log_every=1", "ckpt.every_steps=2", "log.tensorboard=false",
            f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", *extra]  # fmt: skip


def _env(tmp_path: Path, run_dir: Path, release: Path) -> dict:
    (tmp_path / "gate.py").write_text(GATE)
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    hold = run_dir / "checkpoints" / "latest"
    return {**os.environ, "PYTHONPATH": path, "GATE_HOLD": str(hold), "GATE_RELEASE": str(release)}


def test_a_second_job_on_a_run_directory_stops_and_touches_nothing(tmp_path):
    run_dir, release = tmp_path / "runs" / "shared", tmp_path / "release"
    env = _env(tmp_path, run_dir, release)
    first = subprocess.Popen(_command(run_dir), env=env, cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60  # until it holds the lock and its first checkpoint
        while (
            f"pid {first.pid}" not in _read(runlock.lock_path(run_dir))
            or not (run_dir / "checkpoints" / "latest").exists()
        ):
            assert time.monotonic() < deadline and first.poll() is None, "the first job ended"
            time.sleep(0.1)
        before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}
        assert {"metrics.jsonl", "latest", "step_00000002.pt", "config.yaml"} <= set(before)
        started = time.monotonic()
        second = subprocess.run(_command(run_dir, "ckpt.resume=never"), env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        took = time.monotonic() - started
        assert first.poll() is None  # the gate still holds the first job: it was in use
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and took < 30, (took, second.stderr)
        assert lines[-1].startswith("error: run directory") and len(
            [line for line in lines if line.startswith("error")]) == 1, second.stderr  # fmt: skip
        assert str(run_dir) in lines[-1] and f"pid {first.pid}" in lines[-1], lines[-1]
        after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}
        assert after == before  # nothing deleted, truncated, appended or added
    finally:
        release.touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # every step once
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert checkpoint_files.load_file(run_dir)["position"]["step"] == STEPS


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """SIGKILL the job that holds the directory (a lost node), start it again: it resumes.
    The lock is free the moment the job is gone (with a loader worker: see the fork test)."""
    run_dir, release = tmp_path / "runs" / "k", tmp_path / "release"
    env = _env(tmp_path, run_dir, release)
    release.touch()
    fault = {**env, "DISTNN_FAULT": "kill@step:5,rank:0"}
    killed = subprocess.run(_command(run_dir, "data.workers=1"), env=fault, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    fd = os.open(runlock.lock_path(run_dir), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while anyone holds it
    finally:
        os.close(fd)
    again = subprocess.run(_command(run_dir), env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step 4" in again.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS


def test_a_forked_child_holds_no_copy_of_the_lock(tmp_path):
    """A process forked while the lock is held (a DataLoader worker) closes its copy at once:
    the lock goes with its holder, however long the child lives on."""
    run_dir = tmp_path / "r"
    ready, started = os.pipe()
    with runlock.hold(run_dir):
        child = os.fork()
        if child == 0:  # the child outlives the block by two seconds, then leaves
            os.write(started, b"x")  # os.fork has returned here: the fork hooks have run
            time.sleep(2)
            os._exit(0)
        assert os.read(ready, 1) == b"x"
    fd = os.open(runlock.lock_path(run_dir), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while anyone holds it
    finally:
        os.close(fd)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(started)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _write_many(path: str, fill: str, n: int) -> None:
    for _ in range(n):
        fsio.write_text(Path(path), fill * (1 << 18))


def test_two_writers_of_one_file_never_tear_it(tmp_path):
    """Two processes writing the same file at once: each write is whole (no torn file under
    the final name, no writer failing because the other moved its temporary file away)."""
    target = tmp_path / "latest"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(str(target), c, 40)) for c in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    text = target.read_text()
    assert text in ("a" * (1 << 18), "b" * (1 << 18))
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_symlink_at_a_temporary_name_is_never_followed(tmp_path, monkeypatch):
    """A link planted at the temporary name a write will draw: the write takes another name
    and the link's target keeps its bytes."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".latest.tmp").symlink_to(victim)  # the fixed name earlier versions used
    (tmp_path / ".latest.planted.tmp").symlink_to(victim)
    draws = iter(["planted", "fresh"])
    monkeypatch.setattr(fsio.secrets, "token_hex", lambda n: next(draws))
    fsio.write_text(tmp_path / "latest", "step_00000001.pt\n")
    assert victim.read_text() == "precious"
    assert (tmp_path / "latest").read_text() == "step_00000001.pt\n"
    assert next(draws, None) is None  # the planted name was drawn, refused, and redrawn
