"""`pkg.module:callable` names: the user's own models and datasets, imported where they run.

The package is found like any other: on PYTHONPATH or installed in the environment. Every way
such a name can be wrong is one line naming the config key, the name and the cause.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from distnn.errors import UserError, reason

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name: str) -> bool:
    return bool(_IMPORT_PATH.match(name))


def resolve(spec: str, key: str) -> Callable[..., Any]:
    """The callable `pkg.module:attr[.attr]` names."""
    if not is_import_path(spec):
        raise UserError(f"{key}={spec!r} is not an import path (expected pkg.module:callable)")
    module_name, _, attrs = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail to import any way at all
        hint = " (is its package on PYTHONPATH or installed?)" if isinstance(e, ImportError) else ""
        raise UserError(f"{key}={spec!r}: cannot import {module_name}: {reason(e)}{hint}") from None
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            raise UserError(f"{key}={spec!r}: {module_name} has no attribute {attrs!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise UserError(f"{key}={spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def accepted(fn: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The entries of `offered` that `fn` takes as named parameters."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and C extensions may have no signature
        return {}
    return {k: v for k, v in offered.items() if k in params}
