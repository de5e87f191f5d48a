"""The one error type users see as a single line (exit code 2, no traceback)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def reason(e: BaseException) -> str:
    """Why `e` happened, in one line: a UserError's own words, else the exception's type and
    the first line of its message (PIL's, DeepSpeed's and torch's can span lines)."""
    message = str(e).strip()
    text = message if isinstance(e, UserError) else f"{type(e).__name__}: {message}"
    return text.splitlines()[0].rstrip(": ")


def cli(main: Callable[..., T]) -> Callable[..., T]:
    """Turn UserError into `error: <message>` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            # One write, newline included: ranks sharing a stderr (torchrun) then never run
            # two lines into one.
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None

    return wrapper
