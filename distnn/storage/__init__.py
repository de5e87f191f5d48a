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

from pathlib import Path
from typing import Any

from distnn.storage.cache import Cache, default_cache_dir
from distnn.storage.remote import Pipe, Remote, upload
from distnn.storage.urls import (
    PERMANENT,
    PIPE,
    Unreachable,
    Unverified,
    is_remote,
    is_url,
    local_path,
    retry,
    shown,
)

__all__ = [
    "PERMANENT", "PIPE", "Cache", "Local", "Pipe", "Remote", "Unreachable", "Unverified",
    "default_cache_dir", "files", "is_remote", "is_url", "local_path", "retry", "shown", "upload",
]  # fmt: skip


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
