"""Mixed-precision policy: which autocast dtype, and whether a GradScaler guards fp16."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def warning(self) -> str | None:
        """One line for the run log where this precision runs far slower than fp32."""
        if self.name == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            return (
                "warning: precision=bf16 on a CPU without avx512_bf16 or AMX: bf16 is emulated "
                "and runs up to 25x slower than fp32 (precision=fp32 is faster here)"
            )
        return None

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        # bf16 has fp32's exponent range, so only fp16 gradients can underflow.
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively (avx512_bf16 or AMX); unknown (no cpuinfo, as
    on macOS) counts as yes, so that nothing warns without cause."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return True
    # x86 lists "flags", Arm "Features" (bf16 on Graviton3, Grace).
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith(("flags", "Features"))), [])  # fmt: skip
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def build(name: str, device: torch.device) -> Precision:
    if name not in _DTYPES:
        raise UserError(f"precision {name!r} is not one of {', '.join(_DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise UserError(
            f"precision 'fp16' needs a CUDA device (this one is {device.type}); "
            "use precision=bf16 or precision=fp32"
        )
    native = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "bf16" and not native:
        # Pre-Ampere GPUs have no bf16 units: autocast there runs emulated or disables itself
        # with a warning and trains in fp32, unannounced.
        raise UserError(
            f"precision 'bf16' needs a GPU with bf16 (Ampere or newer); "
            f"{torch.cuda.get_device_name(device)} has none: use precision=fp16"
        )
    return Precision(name, device)
