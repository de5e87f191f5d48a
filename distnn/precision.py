"""Mixed-precision policy: which autocast dtype, and whether a GradScaler guards fp16."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from distnn.errors import UserError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str
    device: torch.device

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        # bf16 has fp32's exponent range, so only fp16 gradients can underflow.
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)


def build(name: str, device: torch.device) -> Precision:
    if name not in _DTYPES:
        raise UserError(f"precision {name!r} is not one of {', '.join(_DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise UserError(
            f"precision 'fp16' needs a CUDA device (this one is {device.type}); "
            "use precision=bf16 or precision=fp32"
        )
    return Precision(name, device)
