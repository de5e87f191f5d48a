"""URLs and retries: what every reader and writer of remote bytes shares."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from distnn.errors import UserError, reason

T = TypeVar("T")
# No retry mends these: the object is not there, or this client may not read it.
PERMANENT = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
    NotImplementedError,  # what the protocol cannot do (an HTTP server deletes nothing)
)  # fmt: skip
PIPE = "pipe:"


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


def retry(
    what: str,
    call: Callable[[], T],
    retry_s: float,
    setting: str = "data.retry_s",
    doing: str = "read",
) -> T:
    """call() until it succeeds, backing off 0.5 s, 1 s, 2 s … (at most 8 s) for `retry_s`
    seconds (the config key `setting`); then Unreachable naming `what` and the last error."""
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
                    f"cannot {doing} {what} for {retry_s:g} s ({setting}): {reason(e)}"
                ) from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 8.0)
