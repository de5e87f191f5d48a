"""`model.init_from`: start a new run from weights trained elsewhere.

Takes what people have on disk: a distnn run directory, checkpoint or export, a plain
state_dict (`.pt`/`.pth`, also nested under `state_dict` or `model`, with or without DDP's
`module.` prefix) or `.safetensors`. The classifier head is the one part that may differ (a new
class count): it keeps its fresh initialisation. Anything else that does not fit is one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distnn import checkpoint_files, safeload
from distnn.errors import UserError

KEY = "model.init_from"
TRUSTED = "model.init_from_trusted"
# Prefixes wrappers add to every key: DDP's and torch.compile's.
_WRAPPERS = ("module.", "_orig_mod.")


def read(path: str | Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The model state_dict stored at `path`, in any of the forms above, read by the safe
    loader; `trusted` (model.init_from_trusted=true) lets it unpickle what that refuses."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{KEY}={str(path)!r} does not exist")
    trust = safeload.Trust(f"{TRUSTED}=true", granted=trusted)
    try:
        if path.suffix == ".safetensors":
            return _tensors(path, safeload.safetensors_file(path))
        # A run directory or checkpoint (distnn's own form, sharded too), or a state_dict that
        # may hold more (timm's training checkpoints: argparse options, allowed by name).
        state = checkpoint_files.load_file(path, trust)
        if isinstance(state, dict) and "strategy" in state and "config" in state:
            state = checkpoint_files.model_state(state)
    except UserError as e:
        raise UserError(f"{KEY}={str(path)!r}: {e}") from None
    return _tensors(path, state)


def _tensors(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    for nested in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nested), dict):
            obj = obj[nested]
    tensors = isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())
    if not (tensors and obj):
        raise UserError(f"{KEY}={str(path)!r} holds no state_dict (a mapping of names to tensors)")
    for prefix in _WRAPPERS:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _in(key: str, prefix: str) -> bool:
    return bool(prefix) and (key == prefix or key.startswith(prefix + "."))


def load(model: nn.Module, weights: dict[str, torch.Tensor], head: str, path: str) -> list[str]:
    """Copy `weights` into `model`; the keys under `head` that do not fit stay as they are.
    Returns the model keys left freshly initialised."""
    own = model.state_dict()
    kept = []
    for key, tensor in own.items():
        theirs = weights.get(key)
        if theirs is not None and theirs.shape == tensor.shape:
            continue
        if _in(key, head) or key.endswith("num_batches_tracked"):  # a counter, not a weight
            kept.append(key)
            continue
        if theirs is None:
            raise UserError(f"{KEY}={path!r} has no {key!r} (shape {tuple(tensor.shape)}): "
                            "weights of another architecture?")  # fmt: skip
        raise UserError(
            f"{KEY}={path!r}: {key!r} has shape {tuple(theirs.shape)} there, "
            f"{tuple(tensor.shape)} in this model (if it is the classifier: model.head=)"
        )
    unexpected = [k for k in weights if k not in own and not _in(k, head)]
    if unexpected:
        raise UserError(
            f"{KEY}={path!r} has {unexpected[0]!r}, which this model lacks "
            f"({len(unexpected)} such keys): weights of another architecture?"
        )
    merged = {k: own[k] if k in kept else weights[k] for k in own}
    model.load_state_dict(merged)
    return [k for k in kept if not k.endswith("num_batches_tracked")]
