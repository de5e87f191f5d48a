"""Activation checkpointing (`model.grad_checkpointing=true`): each block's activations are
dropped after its forward and recomputed in backward, trading compute for memory.

timm models use their own `set_grad_checkpointing`. Every other model's blocks (models/blocks:
the ones FSDP shards, `strategy.fsdp.blocks` or the model's `fsdp_blocks`) run under
non-reentrant `torch.utils.checkpoint`. The block keeps its class name, its module and
parameter names (a checkpoint's keys do not change), and FSDP shards it as before: checkpointed
first, sharded after, as torchtitan orders them.

The recomputation runs the block's forward a second time; BatchNorm would then update its
running statistics twice a step. During recomputation they are frozen, so the buffers, like
the gradients, are those of the run without checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distnn.models.blocks import blocks


@contextlib.contextmanager
def _frozen_norms(module: nn.Module) -> Iterator[None]:
    """BatchNorm in training mode without updating running statistics (the recomputation)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms
             if m.num_batches_tracked is not None]  # fmt: skip
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) · running + 0 · batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=False):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` whose forward runs under checkpoint while gradients are on; same name."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = super(checkpointed, self).forward
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)

        def contexts() -> tuple[contextlib.AbstractContextManager, ...]:
            return contextlib.nullcontext(), _frozen_norms(self)

        return checkpoint(run, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    checkpointed = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return checkpointed


def apply(model: nn.Module, names: list[str]) -> str:
    """Checkpoint `model`'s blocks in place; a line for the run log."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return "activation checkpointing: timm's own (set_grad_checkpointing)"
    found = blocks(model, names)
    classes: dict[type, type] = {}
    for block in found:
        cls = type(block)
        block.__class__ = classes.setdefault(cls, _checkpointed(cls))
    kinds = ", ".join(sorted({c.__name__ for c in classes}))
    return f"activation checkpointing: {len(found)} blocks ({kinds}) recomputed in backward"
