"""Checkpoints in `torch.distributed.checkpoint` (DCP) form: every rank writes its own shard of
the model and optimizer into the checkpoint directory, nothing is gathered to one rank, and the
files load at any world size (DCP reshards on load) or, merged, into the plain model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
from torch import nn

from distnn.errors import UserError

FORMAT = "dcp"


def save(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """A collective: every rank writes its shards (the replicated parts once in all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    weights, moments = get_state_dict(model, optimizer)
    if td.is_initialized() and td.get_rank() != 0:
        # Unsharded tensors (BatchNorm statistics) differ per rank: the checkpoint holds rank
        # 0's, as DDP's does. (DCP would write each from whichever rank it balances onto.)
        weights = {k: v for k, v in weights.items() if isinstance(v, DTensor)}
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=directory)


def load(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """A collective: each rank reads the parts of every file its shards cover."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, moments = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": moments}
    _read(state, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])  # fmt: skip


def _metadata(directory: str | Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(directory)).read_metadata()
    except Exception as e:  # missing, truncated or not DCP at all
        raise UserError(f"checkpoint {str(directory)!r} has no readable DCP metadata: "
                        f"{type(e).__name__}") from None  # fmt: skip


def verify(directory: str | Path) -> None:
    """Every file the metadata names is there, as long as the metadata says: a checkpoint cut
    short (a crash, a full disk) is found before any rank starts to load it."""
    sizes: dict[str, int] = {}
    for info in _metadata(directory).storage_data.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sizes.items():
        path = Path(directory) / name
        have = path.stat().st_size if path.is_file() else -1
        if have < size:
            raise UserError(
                f"checkpoint {str(directory)!r} is incomplete: {name} "
                + ("is missing" if have < 0 else f"has {have} of {size} bytes")
            )


def consolidate(directory: str | Path) -> dict[str, torch.Tensor]:
    """The plain model state_dict, in one process with no process group: loads strict into
    the model as built (export, predict, init_from)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "model."
    state = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in _metadata(directory).state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    _read({"model": state}, directory)
    return state


def _read(state: dict[str, Any], directory: str | Path) -> None:
    """dcp.load into `state`; in one process where no process group is up."""
    import torch.distributed.checkpoint as dcp

    alone = not td.is_initialized()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=directory, no_dist=alone)
