"""Files written whole or not at all, and a failed write told in one line.

Every file distnn writes for a run or a dataset goes through here: a full disk (a quota, a
read-only mount) stops the job with `error: cannot write PATH: no space left on device`,
removes the partial temporary file that would keep the disk full, and leaves the previous
version of the file in place.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from distnn.errors import UserError

# Free space below which a write that failed without an errno is taken for a full disk.
FULL_BYTES = 1 << 20

# Descriptors of the file locks this process holds. A forked child (a DataLoader worker) closes
# its copies at once: a copy keeps the lock held after the parent lets go, so a SIGKILLed job's
# run directory would stay locked, and a cache file's lock would be held forever.
_locks: set[int] = set()


def _close_locks() -> None:
    for fd in _locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _locks.clear()


os.register_at_fork(after_in_child=_close_locks)


@contextlib.contextmanager
def lock_held(fd: int) -> Iterator[None]:
    """Within the block, `fd` (holding a lock) is closed in children forked meanwhile; after it,
    fd is closed here too, which lets the lock go."""
    owner = os.getpid()
    _locks.add(fd)
    try:
        yield
    finally:
        if os.getpid() == owner:  # a forked child closed its copy when it was forked
            _locks.discard(fd)
            os.close(fd)


def temp_path(path: Path) -> Path:
    """A fresh name to write `path` under until it is complete: unique per writer, so two
    writers of the same file never share one (a shared name tore a checkpoint), and matching
    `.NAME.*.tmp` (what a crash leaves behind)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


# Never through a symlink planted at the name: a link there would have its target written.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW


def create_temp(path: Path, binary: bool = True) -> tuple[Path, IO[Any]]:
    """A new file under a fresh temporary name beside `path` (temp_path), opened for writing;
    its mode is the umask's, as a plain open's would be (mkstemp's 0600 would hide checkpoints
    from the rest of a group)."""
    while True:
        tmp = temp_path(path)
        try:
            fd = os.open(tmp, _EXCLUSIVE, 0o666)
        except FileExistsError:  # 48 random bits met another writer's: draw again
            continue
        return tmp, os.fdopen(fd, "wb" if binary else "w")


@contextlib.contextmanager
def reporting(path: Path, partial: Path | None = None) -> Iterator[None]:
    """Turn a failed write of `path` into one UserError line naming it and the cause, after
    removing `partial` (what the failed write left: a temporary file or directory). Errors
    that are no file system's fault keep their traceback."""
    try:
        yield
    except BaseException as e:
        error = _write_error(path, e)  # before the removal frees the space it measures
        if partial is not None:
            remove(partial)
        if error is None:
            raise
        raise error from None


def _write_error(path: Path, e: BaseException) -> UserError | None:
    """The one-line error for a failed write of `path`, or None when `e` does not come from
    the file system."""
    seen: BaseException | None = e
    while seen is not None:  # torch.save to a file raises RuntimeError from the OSError
        if isinstance(seen, OSError) and seen.strerror:
            return UserError(f"cannot write {path}: {seen.strerror[0].lower()}{seen.strerror[1:]}")
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    # torch's own C++ writer (torch.save to a path name, as DeepSpeed saves its shards) reports
    # a failed write without an errno: a full disk shows in the free space left.
    if isinstance(e, RuntimeError) and _free_bytes(path) < FULL_BYTES:
        return UserError(f"cannot write {path}: no space left on device")
    return None


def _free_bytes(path: Path) -> int:
    for directory in path.parents:
        with contextlib.suppress(OSError):
            st = os.statvfs(directory)
            return st.f_bavail * st.f_frsize
    return FULL_BYTES


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to write `path` through: a temporary name in the same directory, fsynced and
    renamed into place once the block ends, so a crash leaves the old file or the new one,
    never a truncated file under the final name; a failed write leaves only the old one."""
    with reporting(path):
        tmp, f = create_temp(path, binary="b" in mode)
    with reporting(path, partial=tmp):  # removes the temporary file whatever went wrong
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)


def open_append(path: Path) -> IO[str]:
    """A text file to append lines to, line-buffered (a killed job keeps every line written),
    never through a symlink at its name."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o666)
    return os.fdopen(fd, "a", buffering=1)


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def replace(tmp: Path, path: Path) -> None:
    """Rename into place and fsync the directory, so the rename itself survives a crash."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove(path: Path) -> None:
    """A file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
