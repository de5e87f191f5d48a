"""Checkpoints in `torch.distributed.checkpoint` (DCP) form: every rank writes its own shard of
the model and optimizer into the checkpoint directory, nothing is gathered to one rank, and the
files load at any world size (DCP reshards on load) or, merged, into the plain model.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as td
from torch import nn

from distnn import safeload
from distnn.ema import restore
from distnn.errors import UserError, reason

if TYPE_CHECKING:
    from distnn.ema import EMA

FORMAT = "dcp"


def save(
    model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, ema: EMA | None = None
) -> None:
    """A collective: every rank writes its shards (the replicated parts once in all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    state = _state(model, optimizer, ema)
    if td.is_initialized() and td.get_rank() != 0:
        # Unsharded tensors (BatchNorm statistics) differ per rank: the checkpoint holds rank
        # 0's, as DDP's does. (DCP would write each from whichever rank it balances onto.)
        for part in ("model", "ema"):
            if part in state:
                state[part] = {k: v for k, v in state[part].items() if isinstance(v, DTensor)}
    dcp.save(state, checkpoint_id=directory)


def load(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: str | Path,
    ema: EMA | None = None,
) -> None:
    """A collective: each rank reads the parts of every file its shards cover. An EMA the
    checkpoint does not hold starts over from the loaded weights."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer, ema if _holds(directory, "ema") else None)
    _read(state, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])  # fmt: skip
    restore(ema, {k: local(v) for k, v in state["ema"].items()} if "ema" in state else None)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> dict[str, Any]:
    """What a checkpoint holds, shaped as this run shards it: DCP saves it, and loads into it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, moments = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": moments}
    if ema is not None:
        state["ema"] = _ema_state(weights, ema)
    return state


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage); a plain tensor as it is."""
    # Duck-typed: importing torch.distributed.tensor costs seconds a DDP run need not pay.
    return t.to_local() if hasattr(t, "to_local") else t


def _ema_state(weights: dict[str, torch.Tensor], ema: EMA) -> dict[str, torch.Tensor]:
    """The EMA's tensors as the model's state dict (`weights`) holds its own: this rank's
    averages of sharded parameters as DTensors sharded like them, so that they reshard the same
    way."""
    from torch.distributed.tensor import DTensor

    def like(shard: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if not isinstance(ref, DTensor):
            return shard
        return DTensor.from_local(shard, ref.device_mesh, ref.placements, run_check=False,
                                  shape=ref.shape, stride=ref.stride())  # fmt: skip

    return {k: like(v, weights[k]) for k, v in ema.state_dict().items()}


def _holds(directory: str | Path, part: str) -> bool:
    return any(k.startswith(f"{part}.") for k in _metadata(directory).state_dict_metadata)


def _reader(directory: str | Path) -> Any:
    """DCP's file reader, but for the metadata: DCP unpickles `.metadata` whole, which would
    run any code a planted file names; safeload reads it as DCP's own classes or not at all."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = safeload.dcp_metadata(Path(directory) / ".metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def _metadata(directory: str | Path) -> Any:
    try:
        return _reader(directory).read_metadata()
    except safeload.Refused:
        raise
    except Exception as e:  # missing, truncated or not DCP at all
        raise UserError(f"checkpoint {str(directory)!r} has no readable DCP metadata: "
                        f"{reason(e)}") from None  # fmt: skip


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


def consolidate(directory: str | Path, part: str = "model") -> dict[str, torch.Tensor]:
    """The plain model state_dict (part "model", or "ema": the EMA of the weights), in one
    process with no process group: loads strict into the model as built (export, predict,
    init_from)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not _holds(directory, part):
        raise UserError(f"checkpoint {str(directory)!r} holds no {part} weights")
    prefix = f"{part}."
    state = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in _metadata(directory).state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    _read({part: state}, directory)
    return state


def _planner(directory: str | Path) -> Any:
    """DCP's load planner, but for entries stored as bytes (the optimizer's param_groups, any
    entry the metadata says is bytes): DCP unpickles those whole; here the safe loader reads
    them."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            where = f"{Path(directory) / '.metadata'}: entry {read_item.dest_index.fqn}"
            plain = safeload.torch_bytes(value, where)
            again = io.BytesIO()  # what DCP unpickles now is what the safe loader built
            torch.save(plain, again)
            again.seek(0)
            super().load_bytes(read_item, again)

    return SafePlanner()


def _read(state: dict[str, Any], directory: str | Path) -> None:
    """dcp.load into `state`; in one process where no process group is up. An entry the safe
    loader refuses is one line, on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    alone = not td.is_initialized()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(state, checkpoint_id=directory, storage_reader=_reader(directory),
                     planner=_planner(directory), no_dist=alone)  # fmt: skip
        except CheckpointException as e:  # DCP gathers each rank's failure
            failures = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
            refused = next((f for f in failures if isinstance(f, safeload.Refused)), None)
            if refused is None:
                raise
            raise refused from None
