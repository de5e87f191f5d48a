"""DistributedDataParallel: every rank holds the model; gradients are averaged in buckets that
all-reduce while backward is still running."""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distnn.config import DDPConfig
from distnn.errors import UserError
from distnn.parallel.single import SingleProcess
from distnn.precision import Precision

# torch 2.14 renamed `broadcast_buffers` (now deprecated) to `forward_sync_buffers`.
_SYNC_BUFFERS = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


class DDP(SingleProcess):
    collective = True  # torchrun --nproc_per_node=1 strategy.name=ddp: a group of one

    def __init__(self, precision: Precision, cfg: DDPConfig, device: torch.device) -> None:
        super().__init__(precision)
        if cfg.sync_batchnorm and device.type == "cpu":
            raise UserError(
                "strategy.ddp.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU "
                "path); set it to false on CPU"
            )
        self.cfg, self.device = cfg, device
        self.ddp: DistributedDataParallel | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.sync_batchnorm:
            # Batch statistics over the global batch, not each rank's slice of it.
            self.model = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
            gradient_as_bucket_view=self.cfg.gradient_as_bucket_view,
            static_graph=self.cfg.static_graph,
            find_unused_parameters=self.cfg.find_unused_parameters,
            **{_SYNC_BUFFERS: self.cfg.broadcast_buffers},
        )
        return self.ddp

    def describe(self) -> str:
        return (
            f"ddp over {td.get_backend()}, {td.get_world_size()} processes, "
            f"buckets {self.cfg.bucket_cap_mb:g} MiB, precision {self.precision.name}"
        )

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()
