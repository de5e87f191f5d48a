"""The one door to bytes outside this machine: URLs, retries and the node-local cache.

A URL (`s3://bucket/prefix`, `http(s)://host/path`, `file://`, or any other protocol fsspec
knows) is read through fsspec: s3fs for S3, which takes its endpoint, profile and credentials
from where the aws CLI and boto3 read them (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_PROFILE`, ~/.aws/...); `options` (data.storage_options) adds what those cannot say. No
other module imports fsspec or parses a URL's scheme.

Transient failures (a refused or reset connection, a 5xx, a timeout, a short read) are retried
with backoff for `retry_s` seconds; beyond that, `Unreachable`: one line naming the URL and the
last error. A missing object is not retried.

`Cache` keeps whole files of one URL prefix in a node-local directory: one download per file
per node, whichever process asks first (a file lock; the others wait for it), checked against
the size and sha256 it should have before it is published under its name by a rename, so a
half-downloaded or wrong file is never read. Every download and hit goes into the directory's
ledger, which is how a node's bytes are counted across its ranks and workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from distnn import fsio
from distnn.errors import UserError, reason

T = TypeVar("T")
# No retry mends these: the object is not there, or this client may not read it.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
CHUNK = 4 << 20
LEDGER = ".ledger"
PIPE = "pipe:"
# A client's own retries would multiply distnn's (retry_s is the one deadline): one attempt per
# call, with timeouts that bound it. data.storage_options may say otherwise.
CLIENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {
        "config_kwargs": {
            "retries": {"max_attempts": 1},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
    },
}


class Unreachable(UserError):
    """A URL that stayed unreadable for `retry_s` seconds."""


class Unverified(UserError):
    """A downloaded file whose size or sha256 is not what it should be."""


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def is_remote(path: str | Path) -> bool:
    """A URL whose bytes are outside this machine (anything but file://), or a `pipe:`."""
    text = str(path)
    return text.startswith(PIPE) or (is_url(text) and urlsplit(text).scheme != "file")


def local_path(path: str | Path) -> Path:
    """A local path or file:// URL as a Path."""
    return Path(urlsplit(str(path)).path) if is_url(path) else Path(path)


def shown(url: str) -> str:
    """A URL fit for a log line: any user:password@ taken out."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def retry(what: str, call: Callable[[], T], retry_s: float) -> T:
    """call() until it succeeds, backing off 0.5 s, 1 s, 2 s … (at most 8 s) for `retry_s`
    seconds; then Unreachable naming `what` and the last error."""
    deadline, delay = time.monotonic() + retry_s, 0.5
    while True:
        try:
            return call()
        except PERMANENT:
            raise
        except Exception as e:  # every client raises its own types for a failed connection
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unreachable(
                    f"cannot read {what} for {retry_s:g} s (data.retry_s): {reason(e)}"
                ) from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 8.0)


class Remote:
    """Files under one URL prefix. It pickles (to DataLoader workers); each process makes its
    own client, as fsspec's asynchronous ones do not survive a fork."""

    def __init__(self, root: str, options: dict[str, Any] | None = None, retry_s: float = 120):
        self.root, self.options, self.retry_s = root.rstrip("/"), dict(options or {}), retry_s
        self._client: Any = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_pid": -1}

    def _fs(self) -> Any:
        if self._pid != os.getpid():
            import fsspec

            scheme = urlsplit(self.root).scheme
            options = {**CLIENT_DEFAULTS.get(scheme, {}), **self.options}
            self._client = fsspec.filesystem(scheme, skip_instance_cache=True, **options)
            if scheme == "s3" and "retries" not in self.options:
                self._client.retries = 1  # s3fs's own loop: not a constructor option
            self._pid = os.getpid()
        return self._client

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _stream(self, name: str, sink: Callable[[bytes], object]) -> None:
        """The file's bytes, block by block, into sink."""
        with self._fs().open(self.url(name), "rb", block_size=CHUNK) as f:
            while block := f.read(CHUNK):
                sink(block)

    def read(self, name: str) -> bytes:
        def collect() -> bytes:
            blocks: list[bytes] = []
            self._stream(name, blocks.append)
            return b"".join(blocks)

        return retry(shown(self.url(name)), collect, self.retry_s)

    def size(self, name: str) -> int | None:
        """The file's size, or None where there is none."""
        url = self.url(name)
        try:
            return int(retry(shown(url), lambda: self._fs().info(url), self.retry_s)["size"])
        except FileNotFoundError:
            return None

    def download(self, name: str, out: IO[bytes], size: int | None = None) -> tuple[int, str]:
        """Copy the file into `out` (from its start again after a failure, a short read
        included: fewer bytes than `size`); its byte count and sha256."""

        def copy() -> tuple[int, str]:
            out.seek(0)
            out.truncate()
            digest = hashlib.sha256()

            def sink(block: bytes) -> None:
                out.write(block)
                digest.update(block)

            self._stream(name, sink)
            if size is not None and out.tell() != size:
                raise OSError(f"short read: {out.tell():,} of {size:,} bytes")
            return out.tell(), digest.hexdigest()

        return retry(shown(self.url(name)), copy, self.retry_s)


class Local:
    """A local directory behind the interface a Cache has: where a file is."""

    def __init__(self, root: str | Path) -> None:
        self.root = local_path(root)

    def get(self, name: str, size: int | None = None, sha256: str | None = None) -> Path:
        return self.root / name


def files(root: str, options: dict[str, Any], retry_s: float, cache_dir: str = "") -> Local | Cache:
    """The files under `root`: a local directory (a path or file://) as it is, a remote URL
    through this node's cache."""
    if is_remote(root):
        remote = (Pipe if root.startswith(PIPE) else Remote)(root, options, retry_s)
        return Cache(remote, cache_dir)
    return Local(root)


class Pipe(Remote):
    """`pipe:COMMAND`, as webdataset has it, for a user's own tool: COMMAND with `{}` replaced
    by a file's name writes that file to stdout (`pipe:aws s3 cp s3://bucket/data/{} -`,
    `pipe:curl -sf https://host/data/{}`). A failing command is retried as a failed read."""

    def url(self, name: str) -> str:
        return self.root.replace("{}", name)

    def _stream(self, name: str, sink: Callable[[bytes], object]) -> None:
        command = self.root[len(PIPE) :].replace("{}", shlex.quote(name))
        with tempfile.TemporaryFile() as err:  # a file: a chatty command never blocks on it
            with subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=err) as p:
                assert p.stdout is not None
                while block := p.stdout.read(CHUNK):
                    sink(block)
            if p.returncode != 0:
                err.seek(0)
                why = err.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
                raise OSError(f"{command!r} exited with {p.returncode}: {why[0]}")


def upload(directory: Path, root: str, options: dict[str, Any], retry_s: float) -> int:
    """Put the files of a local `directory` (the sharder's output) under `root`, skipping those
    already there at their size (a re-run resumes), manifest.json last: a reader never finds a
    manifest naming shards not yet uploaded. The number of files put."""
    if root.startswith(PIPE):
        raise UserError(f"{root!r}: a pipe: URL is read-only; write to a directory or a URL")
    remote = Remote(root, options, retry_s)
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    files.sort(key=lambda p: p.name == "manifest.json")
    put = 0
    for path in files:
        url = remote.url(path.name)
        if remote.size(path.name) == path.stat().st_size and path.name != "manifest.json":
            continue
        retry(shown(url), lambda p=path, u=url: remote._fs().put_file(str(p), u), retry_s)
        put += 1
    return put


def default_cache_dir() -> Path:
    """Node-local scratch: Slurm's per-job directory, else $TMPDIR, else the system's."""
    base = os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir()
    return Path(base) / "distnn-cache"


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
