"""The user's own datasets: `data.source=pkg.module:callable`, or datasets handed to distnn.fit.

A map-style dataset of `(image, label)` pairs becomes a Split like the built-in sources, so it
gets their sample order, equal steps per rank, exact eval, augmentation and `data.on_error`.
Images may be PIL images, HWC uint8 arrays (or HW, grayscale) or CHW uint8 tensors.
"""

from __future__ import annotations

import random
from collections.abc import Sized
from typing import Any

import numpy as np
import torch
from PIL import Image

from distnn import imports
from distnn.config import DataConfig
from distnn.data.errors import SampleError
from distnn.data.sources import IMAGENET_MEAN, IMAGENET_STD, MAX_PIXELS, Dataset, check_pixels
from distnn.errors import UserError, reason

KEY = "data.source"
# The data.source a run records for datasets handed to distnn.fit as Python objects.
PYTHON = "python"


def to_chw(image: Any, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An image as a uint8 RGB tensor, 3 × H × W; anything else raises SampleError, as does a
    PIL image of more than `max_pixels` pixels (checked before a lazily opened one decodes)."""
    if isinstance(image, Image.Image):
        check_pixels(image.size, max_pixels)
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif not isinstance(image, torch.Tensor):
        raise SampleError(
            f"image is a {type(image).__name__}; expected a PIL image, an HWC uint8 array "
            "or a CHW uint8 tensor"
        )
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise SampleError(
            f"image is a {image.dtype} {type(image).__name__} of shape {tuple(image.shape)}; "
            "expected uint8, CHW tensors or HWC arrays with 1, 3 or 4 channels"
        )
    if image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    return image[:3].contiguous()


class DatasetSplit:
    """A user's map-style dataset as a Split: one `dataset[i]` per sample read."""

    blocks = None

    def __init__(self, dataset: Any, num_classes: int, max_pixels: int = MAX_PIXELS) -> None:
        self.dataset, self.num_classes, self.max_pixels = dataset, num_classes, max_pixels

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        """H × W × 3 uint8 image and label of `dataset[i]`."""
        item = self.dataset[i]
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise SampleError(f"dataset[{i}] is not an (image, label) pair")
        image, label = item
        if getattr(label, "ndim", None) == 0:  # numpy and torch scalars
            label = label.item()
        k = self.num_classes
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < k:
            raise SampleError(f"label {label!r} is not a class index in 0..{k - 1}")
        return to_chw(image, self.max_pixels).permute(1, 2, 0).numpy(), label

    def where(self, i: int) -> str:
        return f"sample {i}"

    def key(self, i: int) -> str:
        return str(i)


def classes(train: Any, num_classes: int | None, source: str, option: str) -> list[str]:
    """Class names: the dataset's `classes`, else "0".."K-1" for the count K the user gives
    with `option`."""
    names = getattr(train, "classes", None)
    if names is None:
        if num_classes is None:
            raise UserError(f"{source}: the dataset has no `classes` attribute (a list of class "
                            f"names); add one or set {option}")  # fmt: skip
        return [str(i) for i in range(num_classes)]
    names = [str(c) for c in names]
    if not names:
        raise UserError(f"{source}: the dataset's `classes` is empty")
    if num_classes is not None and num_classes != len(names):
        raise UserError(f"{option}={num_classes} does not match the {len(names)} classes of "
                        f"{source}")  # fmt: skip
    return names


def check_map_style(datasets: dict[str, Any], source: str) -> None:
    for split, ds in datasets.items():
        iterable = isinstance(ds, torch.utils.data.IterableDataset)
        if iterable or not isinstance(ds, Sized) or not hasattr(ds, "__getitem__"):
            raise UserError(
                f"{source}: the {split} dataset is a {type(ds).__name__}, not a map-style "
                "dataset (__len__ and __getitem__)"
            )
        if len(ds) == 0:
            raise UserError(f"{source}: the {split} dataset is empty")


def stats(train: Any, name: str) -> tuple[float, float, float]:
    """The dataset's per-channel `mean`/`std` (0-1 or 0-255 units), else ImageNet's."""
    default = IMAGENET_MEAN if name == "mean" else IMAGENET_STD
    values = getattr(train, name, None)
    if values is None:
        return default
    values = [float(v) for v in values]
    if len(values) != 3:
        raise UserError(f"the dataset's {name} must have 3 values (R, G, B), got {values}")
    return tuple(v * 255 if max(values) <= 1 else v for v in values)


def from_datasets(
    train: Any, val: Any, num_classes: int | None, source: str, max_pixels: int = MAX_PIXELS
) -> Dataset:
    """Check two map-style datasets (their first samples are read here, in the main process,
    so a systematic problem is one line before any process group forms)."""
    where = f"{KEY}={source}"
    check_map_style({"train": train, "val": val}, where)
    names = classes(train, num_classes, where, "model.num_classes")
    splits = [DatasetSplit(ds, len(names), max_pixels) for ds in (train, val)]
    for split, s in zip(("train", "val"), splits, strict=True):
        try:
            s.sample(0)
        except Exception as e:  # the user's __getitem__ may raise anything
            raise UserError(f"{where}: {split} sample 0: {reason(e)}") from None
    return Dataset(source, *splits, names, stats(train, "mean"), stats(train, "std"))


def open_split(cfg: DataConfig, split: str) -> Any:
    """The dataset `cfg.source` names, for one split ("train" or "val")."""
    factory = imports.resolve(cfg.source, KEY)
    # A dataset that splits or subsamples at random does so alike on every rank, in every
    # worker that opens it and after every restart.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    try:
        return factory(split=split, root=cfg.root, **cfg.kwargs)
    except UserError:
        raise
    except Exception as e:  # the user's code may raise anything
        raise UserError(f"{KEY}={cfg.source!r}: calling it for split={split!r} raised "
                        f"{reason(e)}") from None  # fmt: skip


def load(cfg: DataConfig, num_classes: int | None) -> Dataset:
    if cfg.source == PYTHON:
        raise UserError(
            f"{KEY}={PYTHON} means datasets handed to distnn.fit(train_data=, val_data=); "
            "here name a built-in source or pkg.module:callable"
        )
    return from_datasets(
        open_split(cfg, "train"), open_split(cfg, "val"), num_classes, cfg.source, cfg.max_pixels
    )
