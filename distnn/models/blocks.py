"""The repeated units of a model: what FSDP shards one by one and what activation
checkpointing recomputes (models/grad_checkpoint.py)."""

from __future__ import annotations

from torch import nn

from distnn.errors import UserError

# The repeated units of the families distnn builds: torchvision's and timm's ResNet blocks,
# torchvision's ViT encoder block and timm's transformer, ConvNeXt and EfficientNet blocks.
BLOCKS = ("BasicBlock", "Bottleneck", "EncoderBlock", "Block", "ConvNeXtBlock",
          "InvertedResidual", "MBConv", "FusedMBConv", "DepthwiseSeparableConv")  # fmt: skip


def blocks(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The model's blocks: its own `fsdp_blocks`, else its modules of the classes `names`
    (default: BLOCKS), outermost only, else its top-level children that hold parameters."""
    own = getattr(model, "fsdp_blocks", None)
    if own is not None:
        return list(own)
    wanted = set(names or BLOCKS)
    found = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
    if names and not found:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise UserError(
            f"strategy.fsdp.blocks={','.join(names)} names no module of this model; its "
            f"classes: {', '.join(kinds)}"
        )
    if found:
        # A block inside another block is sharded with it: keep the outermost.
        inner = {id(c) for m in found for c in m.modules() if c is not m}
        return [m for m in found if id(m) not in inner]
    return [m for m in model.children() if any(True for _ in m.parameters())]
