"""The one place distnn reads files that may come from elsewhere: data, never code.

Weights, checkpoints, exports, DCP metadata and dataset batches are read here and only here:
- torch files with `weights_only=True`: tensors, containers and plain values load; a pickle
  that would import or call anything else is refused in one line naming the file and what it
  would have called. Only with the user's explicit opt-in (`Trust.granted`: `predict --trust`,
  `model.init_from_trusted=true`, ...) is a refused file unpickled whole, never silently.
- safetensors, which holds nothing but tensors;
- formats that only an unpickler which may run code reads (DeepSpeed's checkpoint
  directories) from the run's own directory, which the job holds the lock on, or with the
  opt-in;
- pickles of known shapes by a restricted unpickler: DCP's `.metadata` as DCP's own classes,
  CIFAR's batches as numpy arrays, and nothing else.
Nothing here imports a name found inside a file.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from distnn import fsio
from distnn.errors import UserError, reason

# Harmless classes the safe loader may rebuild beyond tensors and plain containers: numpy's
# array and dtypes (RNG states in checkpoints written before this loader existed, and in
# other tools' checkpoints), argparse.Namespace (timm keeps its training options in one).
_ARRAYS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType,
           np.dtypes.Int64DType, np.dtypes.Float32DType]  # fmt: skip
_RECONSTRUCT = [np._core.multiarray._reconstruct, np._core.multiarray.scalar]
# The same functions as numpy 1.x names them in its pickles (torch matches names as text).
_NUMPY1 = [(f, f"numpy.core.multiarray.{f.__name__}") for f in _RECONSTRUCT]
torch.serialization.add_safe_globals([*_ARRAYS, *_RECONSTRUCT, *_NUMPY1, argparse.Namespace])

_REFUSED = re.compile(r"GLOBAL ([\w.]+)")


@dataclass(frozen=True)
class Trust:
    """Whether the user vouches for the files read, how they say so (`opt_in`, named in every
    refusal) and the directory whose files this job wrote itself (`own`)."""

    opt_in: str
    granted: bool = False
    own: Path | None = None

    def covers(self, path: Path) -> bool:
        """Whether `path` may be read by unpickling: the user said so, or it lies in the run's
        own directory and every file in it is this user's (one another user planted in a
        shared directory is not the run's own)."""
        if self.granted:
            return True
        if self.own is None:
            return False
        path = Path(path).resolve()
        return path.is_relative_to(self.own.resolve()) and all(
            p.lstat().st_uid == os.getuid() for p in [path, *path.rglob("*")]
        )


class Refused(UserError):
    """A file that only an unpickler that runs code could read, and whose reader was not
    trusted."""


def torch_file(path: Path, trust: Trust, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; a file that needs more loads whole only with the
    opt-in."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust.granted:
            raise _refusal(f"{what} {str(path)!r}", _holds(e), trust.opt_in) from None
    except Exception as e:
        raise _unreadable(what, path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the user's choice
    except Exception as e:
        raise _unreadable(what, path, e) from None


def torch_bytes(data: Any, where: str) -> Any:
    """A torch-serialised value inside another file (DCP's bytes entries): weights_only, with
    no opt-in (distnn stores only plain values there)."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(where, _holds(e)) from None


def safetensors_file(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise _unreadable(what, path, e) from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors at `path`, whole or not at all. Each tensor gets its own memory: safetensors
    refuses tensors that share it (tied weights), and the loader needs no such link."""
    from safetensors.torch import save

    own = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with fsio.atomic_open(path, "wb") as f:
        f.write(save(own))


def require(path: Path, trust: Trust, form: str) -> None:
    """`path` is in a form (`form`) that only unpickling reads: go on only where it is the
    job's own or the user trusts it."""
    if not trust.covers(path):
        why = f"it is {form}, which only an unpickler reads"
        raise _refusal(f"checkpoint {str(path)!r}", why, trust.opt_in)


def _holds(e: pickle.UnpicklingError) -> str:
    """What the refused file holds: the global it would have imported and called, else the
    unpickler's own words (an operation it does not take, or no pickle at all)."""
    found = _REFUSED.search(str(e))
    if found:
        return f"it holds {found.group(1)}, which loading would call"
    said = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
    return f"it holds something other than tensors and plain values ({said[0] if said else e!r})"


def _refusal(subject: str, why: str, opt_in: str = "") -> Refused:
    """One line for every refusal: what was refused, why, and the opt-in where there is one."""
    way = (
        f"if you trust whoever made the file, add {opt_in} to load it whole (which runs any "
        "code it names)"
        if opt_in
        else "nothing here loads it whole"
    )
    return Refused(f"{subject} was refused by the safe loader: {why}; {way}")


def _unreadable(what: str, path: Path, e: Exception) -> UserError:
    return UserError(f"{what} {str(path)!r} cannot be read: {reason(e)}")


class _Restricted(pickle._Unpickler):  # the pure-Python unpickler: its BUILD can be guarded
    """An unpickler that builds containers, plain values and the globals `allowed` admits;
    any other global is refused before it is imported, and the admitted ones are only called,
    never changed (BUILD on a class would set its attributes for the whole process)."""

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def __init__(self, f: Any, allowed: Any, **kwargs: Any) -> None:
        super().__init__(f, **kwargs)
        self.allowed, self.found = allowed, set()

    def find_class(self, module: str, name: str) -> Any:
        if not self.allowed(module, name):
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        found = super().find_class(module, name)
        self.found.add(id(found))
        return found

    def _build(self) -> None:
        if id(self.stack[-2]) in self.found:
            raise pickle.UnpicklingError(f"an attempt to change {self.stack[-2]!r}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _build


_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes, in a protocol-2 pickle written by Python 3
}


def _restricted_load(path: Path, what: str, allowed: Any, **kwargs: Any) -> Any:
    try:
        with open(path, "rb") as f:
            return _Restricted(f, allowed, **kwargs).load()
    except pickle.UnpicklingError as e:
        raise _refusal(f"{what} {str(path)!r}", _holds(e)) from None
    except Exception as e:
        raise _unreadable(what, path, e) from None


def array_pickle(path: Path, what: str) -> Any:
    """A pickle of arrays and plain values, such as CIFAR's python-format batches."""
    return _restricted_load(path, what, lambda module, name: (module, name) in _NUMPY,
                            encoding="bytes")  # fmt: skip


_DCP_MODULE = "torch.distributed.checkpoint.metadata"
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


def _dcp_global(module: str, name: str) -> bool:
    """The classes DCP's metadata is made of, torch's dtypes, layouts and Size, a path."""
    if module == _DCP_MODULE:
        import torch.distributed.checkpoint.metadata as meta

        found = getattr(meta, name, None)
        return isinstance(found, type) and found.__module__ == _DCP_MODULE
    if module == "torch.distributed.checkpoint.filesystem":
        return name == "_StorageInfo"
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), _TORCH_VALUES)
    # A layout looked up by its name; the checkpoint's path (StorageMeta.checkpoint_id).
    return (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


def dcp_metadata(path: Path) -> Any:
    """DCP's `.metadata` (a pickle of its own dataclasses) without running anything else."""
    return _restricted_load(path, "DCP metadata", _dcp_global)
