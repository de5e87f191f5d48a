"""Moves batches to the device and normalises them there.

On CUDA the copy of batch t+1 runs on a side stream while batch t computes (pinned host memory
makes the copy truly asynchronous); uint8 travels over PCIe, a quarter of float32's bytes. On
CPU it is a plain loop that converts and normalises. What a batch holds beyond (images,
labels), such as sample indices, passes through on the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class DevicePrefetcher:
    def __init__(
        self,
        loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels_last: bool = False,
    ) -> None:
        self.loader, self.device = loader, device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.loader)

    def _convert(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        # The layout changes on uint8, a quarter of float32's bytes; the float ops keep it.
        x = x.contiguous(memory_format=self.memory_format)
        return (x.float() - self.mean) * self.inv_std, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.stream is None:
            for x, y, *rest in self.loader:
                yield *self._convert(x, y), *rest
            return
        yield from self._cuda_iter()

    def _cuda_iter(self) -> Iterator[tuple[torch.Tensor, ...]]:
        main = torch.cuda.current_stream(self.device)
        # mean and 1/std were made on the main stream: the side stream reads them only after.
        self.stream.wait_stream(main)
        pending = None
        for x, y, *rest in self.loader:
            with torch.cuda.stream(self.stream):
                ready = self._convert(x, y)
            if pending is not None:
                yield pending
            main.wait_stream(self.stream)
            # The tensors were made on the side stream but are used on the main one: tell the
            # caching allocator, or it may hand their memory out while still in use.
            for t in ready:
                t.record_stream(main)
            pending = (*ready, *rest)
        if pending is not None:
            yield pending
