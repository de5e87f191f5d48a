"""`distnn.fit`: the training run `python -m distnn.train` does, from a script or notebook.

    import distnn
    summary = distnn.fit("configs/digits.yaml", ["train.epochs=2"], model=MyNet,
                         train_data=train_ds, val_data=val_ds)

The same script runs unchanged under `torchrun --nproc_per_node=N script.py`: every rank calls
fit with the same arguments, and fit finds the process group's shape in the environment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from distnn import config as config_lib
from distnn.config import Config
from distnn.data.custom import PYTHON as PYTHON_DATA
from distnn.errors import UserError
from distnn.models import ModelArg
from distnn.models.factory import PYTHON as PYTHON_MODEL


def model_name(model: nn.Module | Callable[..., nn.Module]) -> str:
    """What the run records as model.name: the import path of an importable factory or
    class (so predict, export and resume can build it again), else `python:<name>`."""
    if isinstance(model, nn.Module):
        return f"{PYTHON_MODEL}:{type(model).__name__}"
    module, qualname = getattr(model, "__module__", ""), getattr(model, "__qualname__", "")
    if module and module != "__main__" and qualname and "<locals>" not in qualname:
        return f"{module}:{qualname}"
    return f"{PYTHON_MODEL}:{getattr(model, '__name__', type(model).__name__)}"


def fit(
    config: str | Path | Config | None = None,
    overrides: Sequence[str] = (),
    model: ModelArg = None,
    train_data: Any = None,
    val_data: Any = None,
) -> dict[str, Any]:
    """Train as `python -m distnn.train` does and return the run's summary.

    config: a YAML preset path or a Config (defaults without it); overrides: dotted
    `key=value` strings. model: an nn.Module, or a factory called like a
    `model.name=pkg.module:callable` one; default: model.name. train_data, val_data:
    map-style datasets of (image, label) as a `data.source=pkg.module:callable` returns;
    default: data.source. Bad input raises distnn.errors.UserError (one line)."""
    from distnn.train import train  # the whole trainer, only once a run is asked for

    if isinstance(overrides, str):
        raise UserError(f"distnn.fit takes overrides as a list of key=value, got {overrides!r}")
    if (train_data is None) != (val_data is None):
        raise UserError("distnn.fit takes train_data and val_data together (or neither)")
    extra = []
    if model is not None:
        extra.append(f"model.name={model_name(model)}")
    if train_data is not None:
        extra.append(f"data.source={PYTHON_DATA}")
    cfg = config_lib.load(config, [*overrides, *extra])
    datasets = (train_data, val_data) if train_data is not None else None
    return train(cfg, model, datasets)
