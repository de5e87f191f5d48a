"""A run directory belongs to one job at a time.

Rank 0 holds an exclusive `flock` on `.<run.name>.lock` beside the run directory (in
`run.dir`: a run refused for bad input leaves no run directory behind) from before it reads
or writes a checkpoint until the run ends. A second job given the same directory (the same
`run.dir` and `run.name`) stops at once with one line naming the holder, before it has
deleted, truncated or appended anything. The kernel drops the lock with its holder's last
descriptor, so a job that was SIGKILLed or lost its node leaves no stale lock behind: its
requeued self just resumes.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from distnn import fsio
from distnn.errors import UserError, reason


def _holder() -> str:
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    job = os.environ.get("SLURM_JOB_ID")
    slurm = f", Slurm job {job}" if job else ""
    return f"host {socket.gethostname()}, pid {os.getpid()}{slurm}, since {since}"


def lock_path(run_dir: Path) -> Path:
    """Of the directory itself: `runs/a` and a symlink to it share one lock."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(f".{run_dir.name}.lock")


@contextlib.contextmanager
def hold(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """The run directory's lock for the duration of the block (rank 0: `enabled`)."""
    if not enabled:
        yield
        return
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # no O_TRUNC: a job that finds the lock taken must leave the holder's line as it is
        fd = os.open(path, os.O_RDWR | os.O_CREAT | fsio.NOFOLLOW, 0o666)
    except OSError as e:
        raise UserError(f"cannot open the run directory's lock {path}: {reason(e)}") from None
    with fsio.lock_held(fd):  # closing fd releases the lock
        if _lock(fd, run_dir):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (_holder() + "\n").encode(), 0)
        yield


def _lock(fd: int, run_dir: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "holder unknown"
        raise UserError(
            f"run directory {run_dir} is in use by another job ({holder}): wait for it to "
            "end, or give this job its own run.name (or run.dir)"
        ) from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks
        warnings.warn(
            f"cannot lock {lock_path(run_dir)} ({reason(e)}): nothing stops a second job "
            "from using this run directory at the same time",
            stacklevel=3,
        )
        return False
    return True
