"""Real object stores on 127.0.0.1 for the remote-data tests, started and stopped by the tests.

S3: moto's server (`python -m moto.server`, from `moto[server]`), an HTTP implementation of
the S3 API, reached by the real clients (s3fs, boto3) through the standard AWS_* environment
variables, as users reach theirs. It keeps objects in memory: a restarted server is empty, so
`S3Server.restart` uploads the same files again, and the clients reach it through `Gate`, a
TCP forwarder that stays closed (connections refused, as from a stopped server) until the
upload is done: a client never sees the empty bucket a real store's restart would not show.
HTTP: Python's `http.server` serving a directory (whole-file GETs are all a shard needs).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.cluster import free_port

BUCKET = "distnn-test"


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"no server at {url} after {timeout} s") from None
            time.sleep(0.1)


class Server:
    """A server process on a free loopback port."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.command, self.port, self.log = command, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=Path(__file__).parent.parent)  # fmt: skip
        _wait_http(self.url + "/", self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Gate:
    """127.0.0.1:`port` forwarded to `backend`'s port while open; closed, connections to it
    are refused and the open ones reset."""

    def __init__(self, backend: int) -> None:
        self.backend, self.port = backend, free_port()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.backend))
            except OSError:
                client.close()
                continue
            self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            sink.sendall(data)
    for conn in (source, sink):
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


class S3Server(Server):
    """moto's S3 server holding the files of `source` under s3://BUCKET/`prefix`/, reached by
    the clients through a Gate unless `gated` is false."""

    def __init__(self, log: Path, source: Path, prefix: str, gated: bool = True) -> None:
        self.source, self.prefix = source, prefix
        port = free_port()
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        super().__init__(cmd, port, log)
        # Ungated (the benchmark: no forwarder in the way), a restart shows the empty bucket.
        self.gate = Gate(port) if gated else None
        endpoint = port if self.gate is None else self.gate.port
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{endpoint}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.upload()

    @property
    def root(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"

    def upload(self) -> None:
        import boto3

        s3 = boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id="testing",
            aws_secret_access_key="testing-secret", region_name="us-east-1",
        )  # fmt: skip
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=BUCKET)
        for path in sorted(self.source.iterdir()):
            s3.upload_file(str(path), BUCKET, f"{self.prefix}/{path.name}")

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.close()
        super().stop()

    def restart(self) -> None:
        """Start again with the same files (moto keeps nothing), open to the clients once they
        are uploaded."""
        self.start()
        self.upload()
        if self.gate is not None:
            self.gate.open()


class HTTPServer(Server):
    """Python's http.server serving `directory` at http://127.0.0.1:PORT/; `writable`, one that
    takes PUT too (tests/http_put_server.py)."""

    def __init__(self, log: Path, directory: Path, writable: bool = False) -> None:
        port = free_port()
        cmd = ([sys.executable, "-m", "tests.http_put_server", str(port), str(directory)]
               if writable else
               [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                "--directory", str(directory)])  # fmt: skip
        super().__init__(cmd, port, log)
