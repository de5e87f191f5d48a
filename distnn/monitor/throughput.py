"""Images/s, step time and data-wait share, read at log intervals only.

Time is taken with host timestamps; the caller reads the meter right after the log interval's
single `.item()`, which has already waited for the device, so the figures are honest on CUDA
without any per-step synchronisation.
"""

from __future__ import annotations

import time


class Throughput:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.steps = 0
        self.wait = 0.0

    def add(self, images: int, steps: int = 1) -> None:
        self.images += images
        self.steps += steps

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds

    def read(self) -> dict[str, float]:
        """Figures since the last read; starts the next window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        per_device = self.images / elapsed
        out = {
            "images_per_sec": per_device * self.world_size,
            "images_per_sec_per_device": per_device,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait": self.wait / elapsed,
        }
        self.reset()
        return out
