"""DistributedDataParallel: every rank holds the model; gradients are averaged in buckets that
all-reduce while backward is still running."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
import torch.distributed as td
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
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
        self.mark: Callable[[], None] | None = None

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
        self.ddp.register_comm_hook(None, self._allreduce)
        return self.ddp

    # No annotations: DDP checks them, and `from __future__` makes them strings.
    def _allreduce(self, state, bucket):
        # DDP's own all-reduce (the same hook it runs by default), and the moment the last
        # bucket is ready: from there to the end of backward this rank waits for the others.
        if bucket.is_last() and self.mark is not None:
            self.mark()
        return default_hooks.allreduce_hook(None, bucket)

    def on_comm(self, mark: Callable[[], None]) -> None:
        self.mark = mark

    def describe(self) -> str:
        return (
            f"ddp over {td.get_backend()}, {td.get_world_size()} processes, "
            f"buckets {self.cfg.bucket_cap_mb:g} MiB, precision {self.precision.name}"
        )

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()
