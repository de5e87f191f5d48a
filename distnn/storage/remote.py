"""Files under one URL prefix, read and written through fsspec, every call retried."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

from distnn import fsio
from distnn.errors import UserError
from distnn.storage.urls import PIPE, retry, shown

CHUNK = 4 << 20
T = TypeVar("T")
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


class Remote:
    """Files under one URL prefix. It pickles (to DataLoader workers); each process makes its
    own client, as fsspec's asynchronous ones do not survive a fork."""

    def __init__(
        self,
        root: str,
        options: dict[str, Any] | None = None,
        retry_s: float = 120,
        setting: str = "data.retry_s",
    ) -> None:
        self.root, self.options, self.retry_s = root.rstrip("/"), dict(options or {}), retry_s
        self.setting = setting  # the config key a give-up names
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

        return self._retry(name, collect)

    def size(self, name: str) -> int | None:
        """The file's size, or None where there is none."""
        url = self.url(name)
        try:
            return int(self._retry(name, lambda: self._fs().info(url))["size"])
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

        return self._retry(name, copy)

    def put(self, path: Path, name: str) -> None:
        """The local file at `path` as `name`, whole (sent again from its start after a
        failure; an object store publishes an object only once all of it arrived)."""
        url = self.url(name)
        if self._local():
            Path(url.split("://", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        # fsspec's HTTP put_file POSTs unless told: a store takes PUT.
        how = {"method": "put"} if urlsplit(self.root).scheme in ("http", "https") else {}
        self._retry(name, lambda: self._fs().put_file(str(path), url, **how), "write")

    def write(self, name: str, data: bytes) -> None:
        """`data` as `name`, whole or not at all (a local one through a rename)."""
        if self._local():
            target = Path(self.url(name).split("://", 1)[1])
            target.parent.mkdir(parents=True, exist_ok=True)
            with fsio.atomic_open(target, "wb") as f:
                f.write(data)
            return
        self._retry(name, lambda: self._fs().pipe_file(self.url(name), data), "write")

    def remove(self, name: str) -> None:
        """`name` gone (already gone is fine). NotImplementedError where the protocol deletes
        nothing (HTTP)."""

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self._fs().rm_file(self.url(name))

        self._retry(name, rm, "remove")

    def _retry(self, name: str, call: Callable[[], T], doing: str = "read") -> T:
        return retry(shown(self.url(name)), call, self.retry_s, self.setting, doing)

    def _local(self) -> bool:
        return urlsplit(self.root).scheme == "file"


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
        if remote.size(path.name) == path.stat().st_size and path.name != "manifest.json":
            continue
        remote.put(path, path.name)
        put += 1
    return put
