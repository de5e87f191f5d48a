"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state
sharded over the ranks, each block gathered for its forward and backward only. Checkpoints
are DCP directories: each rank writes its own shards, and they load at any world size.

Blocks are sharded first, then the root: a model's residual blocks or transformer blocks where
its family has them (`strategy.fsdp.blocks` names classes for any other model, or the model
lists its own in a `fsdp_blocks` attribute), else its top-level children.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as td
from torch import nn

from distnn.config import FSDPConfig
from distnn.errors import UserError
from distnn.models.blocks import blocks
from distnn.parallel import dcp
from distnn.parallel.single import SingleProcess
from distnn.precision import Precision

if TYPE_CHECKING:
    from distnn.models import deferred


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (the norm of sharded gradients is one)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class FSDP(SingleProcess):
    collective = True
    lockstep_forward = True  # a sharded forward gathers parameters: every rank must run it

    def __init__(self, precision: Precision, cfg: FSDPConfig, device: torch.device,
                 graph: bool = False, channels_last: bool = False) -> None:  # fmt: skip
        if graph:
            # The trace is a forward on rank 0 alone; its parameter gathers would wait forever.
            raise UserError("log.tensorboard_graph=true is not available with strategy.name=fsdp")
        if channels_last:
            raise UserError(
                "model.channels_last=true is not available with strategy.name=fsdp: FSDP2 "
                "shards contiguous parameters only"
            )
        super().__init__(precision)
        self.cfg, self.device = cfg, device
        self.meta_init = cfg.meta_init
        self.built: deferred.Stats | None = None
        self.sharded: list[nn.Module] = []
        self.kinds: list[str] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        mesh = init_device_mesh(self.device.type, (td.get_world_size(),))
        mixed = MixedPrecisionPolicy(
            param_dtype=self.precision.dtype,
            reduce_dtype=torch.float32 if self.cfg.reduce_fp32 else self.precision.dtype,
        )
        offload = (
            CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
            if self.cfg.offload == "cpu"
            else OffloadPolicy()
        )
        options = {"mesh": mesh, "mp_policy": mixed, "offload_policy": offload}
        self.sharded = blocks(model, self.cfg.blocks)
        self.kinds = sorted({type(m).__name__ for m in self.sharded})  # before FSDP renames them
        for block in self.sharded:
            fully_shard(block, reshard_after_forward=self.cfg.reshard_after_forward, **options)
        # The root's parameters are used last in backward: gathering them again is no saving.
        fully_shard(model, reshard_after_forward=False, **options)
        from distnn.models import deferred  # models import checkpoint, which imports parallel

        recipe = deferred.recipe(model)
        if recipe is not None:
            self._materialize(model, recipe)
        return model

    def _materialize(self, model: nn.Module, recipe: deferred.Recipe) -> None:
        # Offloaded shards live on the CPU; buffers (not sharded) stay where compute is.
        offload = self.cfg.offload == "cpu"
        model.to_empty(device=torch.device("cpu") if offload else self.device)
        self.built = recipe.materialize(model)
        if offload and self.device.type != "cpu":
            for module in model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    module._buffers[name] = buffer.to(self.device)

    def describe(self) -> str:
        return (
            f"fsdp over {td.get_backend()}, {td.get_world_size()} processes, "
            f"{len(self.sharded)} blocks ({', '.join(self.kinds)}) + root, "
            f"precision {self.precision.name}"
            + (", reduce fp32" if self.cfg.reduce_fp32 and self.precision.dtype else "")
            + (", offload cpu" if self.cfg.offload == "cpu" else "")
            + (f"; {self.built.describe()}" if self.built is not None else "")
        )

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        # Gradients of non-final micro-batches accumulate unsharded: no reduce-scatter.
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return _full(super().clip_grad_norm(max_norm))

    # --- checkpoints: each rank writes its own shards (DCP); nothing is gathered ------------

    def save_shards(self, directory: Path) -> None:
        dcp.save(self.model, self.optimizer, directory, self.ema)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: dcp.local(v) for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": dcp.FORMAT,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_full(self, state: dict[str, Any]) -> None:
        raise UserError(
            "the checkpoint holds the whole model and optimizer (a single-process or DDP "
            "run's): strategy.name=fsdp resumes from its own checkpoints; start from its "
            "weights with model.init_from and another run.name"
        )
