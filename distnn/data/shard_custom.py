"""The sharder's side of a user's own dataset: `python -m distnn.data.shard pkg.module:callable`.

The main process opens the train and val datasets once (`collect`: classes, lengths, mean/std);
each encoding worker opens them again itself (`open_splits`, the pool's initializer), so the
datasets need not be picklable, and reads its samples with `read`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from PIL import Image

from distnn import imports
from distnn.config import DataConfig
from distnn.data import custom
from distnn.data.custom import DatasetSplit
from distnn.errors import UserError, reason

SPLITS = ("train", "val")  # the loader trains on train and evaluates on val

# This process's datasets, by split: the main process's from `collect`, a worker's from
# `open_splits`; and why a worker could not open them.
_SPLITS: dict[str, DatasetSplit] = {}
_BROKEN: str | None = None


@dataclass(frozen=True)
class Source:
    """What a worker needs to open the datasets itself (picklable)."""

    spec: str
    root: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 0

    def config(self) -> DataConfig:
        return DataConfig(source=self.spec, root=self.root, kwargs=dict(self.kwargs))


class WorkerError(UserError):
    """A worker could not open what the main process opened: the run stops (not a skip)."""


def parse_kwargs(pairs: list[str]) -> dict[str, Any]:
    """`--kwarg KEY=VALUE` options → keyword arguments; values read as YAML scalars."""
    kwargs: dict[str, Any] = {}
    for text in pairs:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"--kwarg {text!r} is not KEY=VALUE (e.g. --kwarg n=100)")
        if key in ("split", "root"):
            raise UserError(f"--kwarg {key}=: the sharder passes {key}= itself (root: SRC)")
        try:
            value = yaml.safe_load(raw) if raw else ""
            json.dumps(value)  # recorded in the manifest: dates and the like stay text
        except (yaml.YAMLError, TypeError, ValueError):
            value = raw
        kwargs[key] = value
    return kwargs


def check(
    kind: str, builtin: tuple[str, ...], kwargs: dict | None, num_classes: int | None
) -> bool:
    """Whether `kind` names a user's dataset; one line for anything else but a built-in kind,
    and for options only a user's dataset takes."""
    user = kind not in builtin
    if user and not imports.is_import_path(kind):
        raise UserError(
            f"kind {kind!r} is not one of {', '.join(builtin)} or a pkg.module:callable"
        )
    if not user and (kwargs or num_classes is not None):
        raise UserError(f"--kwarg and --num-classes are for a pkg.module:callable, not {kind}")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"--num-classes must be >= 1, got {num_classes}")
    return user


def collect(spec: str, root: str, kwargs: dict | None, num_classes: int | None) -> tuple[
    Source, list[str], dict[str, int], tuple[float, ...], tuple[float, ...]
]:  # fmt: skip
    """Open SPEC's splits here: (the workers' Source, classes, split lengths, mean, std)."""
    imports.resolve(spec, "kind")  # an import error names the argument the user gave
    kwargs = dict(kwargs or {})
    cfg = DataConfig(source=spec, root=root, kwargs=kwargs)
    try:
        datasets = {split: custom.open_split(cfg, split) for split in SPLITS}
    except UserError as e:  # named as the sharder's argument, not as the config key
        raise UserError(str(e).replace(f"{custom.KEY}=", "kind=", 1)) from None
    custom.check_map_style(datasets, spec)
    train = datasets["train"]
    classes = custom.classes(train, num_classes, spec, "--num-classes")
    source = Source(spec, root, kwargs, len(classes))
    _SPLITS.clear()
    _SPLITS.update({s: DatasetSplit(ds, len(classes)) for s, ds in datasets.items()})
    lengths = {split: len(ds) for split, ds in datasets.items()}
    return source, classes, lengths, custom.stats(train, "mean"), custom.stats(train, "std")


def open_splits(source: Source) -> None:
    """A worker's own datasets. Never raises: a failing pool initializer makes the pool start
    worker after worker; `read` reports the failure instead."""
    global _BROKEN
    try:
        cfg = source.config()
        splits = {s: DatasetSplit(custom.open_split(cfg, s), source.num_classes) for s in SPLITS}
    except Exception as e:  # the user's code may raise anything
        _BROKEN = reason(e)
        return
    _SPLITS.clear()
    _SPLITS.update(splits)


def close() -> None:
    _SPLITS.clear()


def read(split: str, index: int, resize: int | None) -> tuple[Image.Image, int]:
    """Sample `index` of `split` as an RGB image (downscaled to short side `resize` when it is
    larger) and its label; raises for a sample the dataset cannot give."""
    if _BROKEN is not None:
        raise WorkerError(f"an encoding worker could not open the dataset: {_BROKEN}")
    hwc, label = _SPLITS[split].sample(index)
    img = Image.fromarray(np.ascontiguousarray(hwc))
    w, h = img.size
    if resize is not None and min(w, h) > resize:  # as shard.encode resizes
        scale = resize / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    return img, label
