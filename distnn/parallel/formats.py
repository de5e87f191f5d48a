"""Checkpoint directories hold a strategy's own files (DeepSpeed's ZeRO shards, DCP shards):
what reads each kind without the strategy that wrote it (export, predict, init_from, resume)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distnn.errors import UserError
from distnn.parallel import dcp, deepspeed


@dataclass(frozen=True)
class Format:
    # (shards, part "model" or "ema") -> the plain state_dict of the weights or their EMA
    consolidate: Callable[[str, str], dict[str, torch.Tensor]]
    verify: Callable[[str], None]  # raises UserError where the files are incomplete
    any_world_size: bool  # whether they load at another number of processes
    # What the files are, where only an unpickler that may run code reads them (safeload.py:
    # the run's own directory, or the user's trust); None where distnn reads them safely.
    pickled: str | None = None


FORMATS = {
    "deepspeed": Format(
        deepspeed.consolidate,
        lambda directory: None,
        any_world_size=False,
        pickled="a DeepSpeed checkpoint directory",
    ),
    dcp.FORMAT: Format(dcp.consolidate, dcp.verify, any_world_size=True),
}


def of(strategy_state: dict[str, Any]) -> Format:
    """The format of a checkpoint's strategy state (read from a directory: it has "shards")."""
    name = strategy_state.get("format")
    if name not in FORMATS:
        raise UserError(f"checkpoint holds shards of an unknown format {name!r}; known: "
                        f"{', '.join(FORMATS)}")  # fmt: skip
    return FORMATS[name]
