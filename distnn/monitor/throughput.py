"""This rank's images/s, step time, device memory and MFU, read at log intervals only (the
whole job's figures: monitor/ranks.py).

Time is taken with host timestamps; the caller reads the meter right after the log interval's
single `.item()`, which has already waited for the device, so the figures are honest on CUDA
without any per-step synchronisation.

MFU (model FLOPs utilisation) = achieved model FLOP/s per device / the device's peak. The model
FLOPs of one training image are counted once at start with `torch.utils.flop_counter` on one
forward pass, times 3: the backward pass costs about twice the forward (a gradient for the
input and one for the weights per matmul/conv). Only matmuls and convolutions count, as in the
usual MFU definition; norms, activations and the optimizer are left out. The peak is the
device's dense bf16 tensor-core figure whatever `precision` runs, so fp32/TF32 runs show lower
MFU. Devices missing from the table get no MFU (never a guess); `tflops_per_device` is still
reported on any CUDA device.
"""

from __future__ import annotations

import re
import resource
import sys
import time

import torch
from torch import nn

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets. The
# first pattern that matches `torch.cuda.get_device_name()` wins, so variants come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bA100\b", 312.0),  # SXM4 and PCIe, 40 and 80 GB
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.0),  # SXM5 (HBM3)
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),  # SXM
    (r"\bGH200\b", 989.0),  # Grace Hopper superchip's GPU
)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device, FLOP/s; None when the name is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops * 1e12
    return None


def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass of `model` on `inputs` (a multiply-add counts as 2), without
    touching the model's state: eval mode (no BatchNorm statistics update), no autograd."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def train_flops_per_image(model: nn.Module, image_size: int, device: torch.device) -> float:
    """Model FLOPs of training on one image: 3 × its forward FLOPs (forward + backward)."""
    batch = 2  # not 1: some layers refuse a batch of one
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(batch, 3, image_size, image_size, device=device, dtype=dtype)
    return 3.0 * count_flops(model, x) / batch


def memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory tensors have held on this device since the last read (allocator
    peak, no sync). Elsewhere: the process's peak resident set size (one getrusage call; reading
    /proc for the current size cost ~0.1 ms per log here)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; else KiB


class Throughput:
    def __init__(
        self,
        device: torch.device | None = None,
        flops_per_image: float | None = None,
        peak: float | None = None,
    ) -> None:
        self.device = device
        self.flops_per_image = flops_per_image  # model FLOPs of training on one image
        self.peak = peak  # FLOP/s of one device
        self.reset()

    @classmethod
    def for_model(cls, model: nn.Module, image_size: int, device: torch.device) -> Throughput:
        """A meter that also reports memory and, on CUDA, achieved TFLOP/s and MFU (the FLOPs
        are counted once, here)."""
        if device.type != "cuda":
            return cls(device)
        flops = train_flops_per_image(model, image_size, device)
        return cls(device, flops, peak_flops(torch.cuda.get_device_name(device)))

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.steps = 0

    def add(self, images: int, steps: int = 1) -> None:
        self.images += images
        self.steps += steps

    def read(self) -> dict[str, float]:
        """Figures since the last read, with the counts behind them (images, steps, seconds);
        starts the next window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_device = self.images / elapsed
        out = {
            "images": float(self.images),
            "steps": float(self.steps),
            "seconds": elapsed,
            "images_per_sec_per_device": per_device,
            "step_time_s": elapsed / max(self.steps, 1),
        }
        if self.device is not None:
            out["memory_gib"] = memory_bytes(self.device) / 2**30
            if self.device.type == "cuda":  # the next read reports the next interval's peak
                torch.cuda.reset_peak_memory_stats(self.device)
        if self.flops_per_image:
            achieved = per_device * self.flops_per_image
            out["tflops_per_device"] = achieved / 1e12
            if self.peak:
                out["mfu"] = achieved / self.peak
        self.reset()
        return out
