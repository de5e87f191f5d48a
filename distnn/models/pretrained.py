"""`model.init_from`: start a new run from weights trained elsewhere.

Takes what people have on disk: a distnn run directory, checkpoint or export, a plain
state_dict (`.pt`/`.pth`, also nested under `state_dict` or `model`, with or without DDP's
`module.` prefix) or `.safetensors`. The classifier head is the one part that may differ (a new
class count): it keeps its fresh initialisation. Anything else that does not fit is one line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distnn import checkpoint
from distnn.errors import UserError, reason

KEY = "model.init_from"
# Prefixes wrappers add to every key: DDP's and torch.compile's.
_WRAPPERS = ("module.", "_orig_mod.")


def read(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict stored at `path`, in any of the forms above."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{KEY}={str(path)!r} does not exist")
    if path.is_dir():  # a run directory or a directory checkpoint: distnn's own
        try:
            return checkpoint.model_state(checkpoint.load_file(path))
        except UserError as e:
            raise UserError(f"{KEY}={str(path)!r}: {e}") from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _tensors(path, _guard(path, lambda: load_file(str(path))))
    try:  # tensors only: what an export or a published state_dict holds
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A training checkpoint holds more (distnn's RNG states, timm's argparse options): a
        # file the user names as their weights is unpickled whole, as timm's loader does.
        obj = _guard(path, lambda: torch.load(path, map_location="cpu", weights_only=False))
    except Exception as e:
        raise UserError(f"{KEY}={str(path)!r} cannot be read: {reason(e)}") from None
    if isinstance(obj, dict) and "strategy" in obj and "config" in obj:  # a distnn checkpoint
        obj = checkpoint.model_state(obj)
    return _tensors(path, obj)


def _guard(path: Path, load: Any) -> Any:
    try:
        return load()
    except Exception as e:
        raise UserError(f"{KEY}={str(path)!r} cannot be read: {reason(e)}") from None


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
