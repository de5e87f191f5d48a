"""Real object stores on 127.0.0.1 for the remote-data tests, started and stopped by the tests.

S3: moto's server (`python -m moto.server`, from `moto[server]`), an HTTP implementation of
the S3 API, reached by the real clients (s3fs, boto3) through the standard AWS_* environment
variables, as users reach theirs. It keeps objects in memory: a restarted server is empty, so
`S3Server.restart` uploads the same files again. HTTP: Python's `http.server` serving a
directory (whole-file GETs are all a remote shard needs).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
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
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        _wait_http(self.url + "/", self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class S3Server(Server):
    """moto's S3 server holding the files of `source` under s3://BUCKET/`prefix`/."""

    def __init__(self, log: Path, source: Path, prefix: str) -> None:
        self.source, self.prefix = source, prefix
        port = free_port()
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        super().__init__(cmd, port, log)
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
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

    def restart(self) -> None:
        """Start again on the same port with the same files (moto keeps nothing)."""
        self.start()
        self.upload()


class HTTPServer(Server):
    """Python's http.server serving `directory` at http://127.0.0.1:PORT/."""

    def __init__(self, log: Path, directory: Path) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
               "--directory", str(directory)]  # fmt: skip
        super().__init__(cmd, port, log)
