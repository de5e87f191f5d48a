"""The node-local cache: whole files of one URL prefix, downloaded once per node."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from distnn import fsio
from distnn.errors import UserError
from distnn.storage.remote import Remote
from distnn.storage.urls import Unreachable, Unverified, shown

LEDGER = ".ledger"


def default_cache_dir() -> Path:
    """Node-local scratch: Slurm's per-job directory, else $TMPDIR, else the system's; one of
    this user's own (0700), since the system's temp dir is every user's and a file another
    user put in a cache at the right size would be read as the shard."""
    base = os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir()
    path = Path(base) / f"distnn-cache-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UserError(
            f"{path} is not a directory of this user's alone (mode 0700): another user may "
            "have made it; remove it or set data.cache_dir"
        )
    return path


class Cache:
    """Whole files of `remote` in `directory` (default_cache_dir() when empty), in a
    subdirectory of their own per URL prefix."""

    def __init__(self, remote: Remote, directory: str | Path = "") -> None:
        self.remote = remote
        base = Path(directory) if str(directory) else default_cache_dir()
        self.dir = base / hashlib.sha256(remote.root.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def has(self, name: str, size: int | None = None) -> bool:
        """Whether this node holds the file (of `size` bytes, where given)."""
        return _present(self.path(name), size)

    def read(self, name: str) -> bytes:
        """A small file's bytes straight from the remote (the manifest: read fresh, once)."""
        return self.remote.read(name)

    def get(self, name: str, size: int | None = None, sha256: str | None = None) -> Path:
        """The file's local path, downloaded first unless this node has it."""
        path = self.path(name)
        if self.has(name, size):
            self._note(f"hit {name}")
            return path
        asked = time.time()
        failed = self.dir / f".{name}.failed"
        with self._locked(name):
            if self.has(name, size):  # another process fetched it while this one waited
                self._note(f"hit {name}")
                return path
            with contextlib.suppress(FileNotFoundError):
                if failed.stat().st_mtime >= asked:  # it gave up while this one waited: so
                    kind, why = failed.read_text().split("\n", 1)  # would this, as long again
                    raise (Unverified if kind == "Unverified" else Unreachable)(why)
            tmp, out = fsio.create_temp(path)
            try:
                with out:
                    n, digest = self.remote.download(name, out, size)
                _verify(shown(self.remote.url(name)), digest, sha256)
                os.replace(tmp, path)
            except (Unreachable, Unverified) as e:
                failed.write_text(f"{type(e).__name__}\n{e}")
                raise
            finally:
                tmp.unlink(missing_ok=True)
            self._note(f"get {name} {n}")
        return path

    def evict(self, name: str) -> None:
        with self._locked(name):
            self.path(name).unlink(missing_ok=True)

    def held(self) -> dict[str, int]:
        """Bytes of each published file."""
        sizes = {}
        for entry in os.scandir(self.dir):
            if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                sizes[entry.name] = entry.stat().st_size
        return sizes

    def ledger_end(self) -> int:
        """Where the ledger ends now: `counts(since=...)` counts what came after."""
        with contextlib.suppress(FileNotFoundError):
            return (self.dir / LEDGER).stat().st_size
        return 0

    def counts(self, since: int = 0) -> tuple[int, int, dict[str, int]]:
        """Bytes downloaded, hits, and downloads per file, on this node since `since`."""
        try:
            with open(self.dir / LEDGER, "rb") as f:
                f.seek(since)
                lines = f.read().decode().splitlines()
        except FileNotFoundError:
            lines = []
        downloaded, hits, per_file = 0, 0, {}
        for line in lines:
            kind, name, *n = line.split(" ")
            if kind == "get":
                downloaded += int(n[0])
                per_file[name] = per_file.get(name, 0) + 1
            else:
                hits += 1
        return downloaded, hits, per_file

    def _note(self, line: str) -> None:
        # O_APPEND writes of one short line land whole, whichever process writes them.
        with fsio.open_append(self.dir / LEDGER) as f:
            f.write(line + "\n")

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        fd = os.open(self.dir / f".{name}.lock", os.O_RDWR | os.O_CREAT | fsio.NOFOLLOW, 0o666)
        with fsio.lock_held(fd):
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield


def _present(path: Path, size: int | None) -> bool:
    try:
        held = path.stat().st_size
    except FileNotFoundError:
        return False
    return size is None or held == size


def _verify(url: str, digest: str, sha256: str | None) -> None:
    if sha256 is not None and digest != sha256:
        raise Unverified(
            f"{url}: sha256 {digest[:16]}… downloaded, the manifest says {sha256[:16]}…"
        )
