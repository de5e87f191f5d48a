"""Readers that turn a dataset on disk (or a seed) into splits of uint8 CHW images + labels."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from distnn import safeload
from distnn.config import DataConfig
from distnn.data.errors import SampleError
from distnn.errors import UserError, reason

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp")
# data.max_pixels where no config is at hand (python -m distnn.predict, the sharder).
MAX_PIXELS: int = DataConfig.max_pixels


Encoded = bytes | Path  # an image not yet decoded: its bytes, or its file


class Split(Protocol):
    """What every source gives the one Reader (data/__init__.py) and the one order (order.py).

    `sample(i)`: sample i as encoded bytes or a file (the Reader decodes them) or an H × W × 3
    uint8 array, and its label; raises for a sample that cannot be read (`data.on_error`).
    `where(i)`: where sample i lives, for error lines; `key(i)`: its name in a predictions
    file (a file's path, a shard's member, an index), unique in the split. `blocks`: sample
    counts of runs of consecutive indices read together (a shard's members), or None where any
    index is as cheap to read as any other; the order keeps a block's samples together."""

    blocks: list[int] | None

    def __len__(self) -> int: ...

    def sample(self, i: int) -> tuple[Encoded | np.ndarray, int]: ...

    def where(self, i: int) -> str: ...

    def key(self, i: int) -> str: ...


@dataclass
class ArraySplit:
    """Images already decoded in memory (CIFAR, synthetic)."""

    images: torch.Tensor  # N × 3 × H × W, uint8
    labels: torch.Tensor  # N, int64
    blocks = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i].permute(1, 2, 0).numpy(), self.label(i)

    def where(self, i: int) -> str:
        return f"sample {i}"

    def key(self, i: int) -> str:
        return str(i)


@dataclass
class FileSplit:
    """Encoded image files decoded on demand (ImageFolder)."""

    paths: list[Path]
    labels: list[int]
    max_pixels: int = MAX_PIXELS
    blocks = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        return read_image(self.paths[i], self.max_pixels)

    def label(self, i: int) -> int:
        return self.labels[i]

    def sample(self, i: int) -> tuple[Path, int]:
        return self.paths[i], self.labels[i]

    def where(self, i: int) -> str:
        return f"image {str(self.paths[i])!r}"

    def key(self, i: int) -> str:
        return str(self.paths[i])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    classes: list[str]
    # Per-channel statistics for normalisation, in 0-255 units (applied per batch on device).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# PIL's bomb check reads a module global at open time; opens swap it under this lock.
_PIL_LIMIT = threading.Lock()


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """A SampleError naming the image's size where it has more than `max_pixels` pixels (read
    from its header, before any decoding: width × height × 3 bytes is what decoding takes)."""
    width, height = size
    if width * height > max_pixels:
        raise SampleError(
            f"image of {width} × {height} = {width * height:,} pixels, over "
            f"data.max_pixels={max_pixels:,}"
        )


def open_image(source: bytes | Path, max_pixels: int) -> Image.Image:
    """The image's header, its pixels not yet decoded; check_pixels' SampleError where it has
    more than `max_pixels` pixels. That limit replaces PIL's own decompression-bomb check
    (a warning above 89 M pixels, an error above 179 M), so data.max_pixels is the one that
    applies, in either direction."""
    with _PIL_LIMIT:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    try:
        check_pixels(img.size, max_pixels)
    except SampleError:
        img.close()
        raise
    return img


def decode_rgb(data: Encoded, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The one decoder: encoded image (bytes or a file) → H × W × 3 uint8 RGB (PIL: maintained,
    every format; torchvision.io's decoders are deprecated since 0.29). PIL reads a file as it
    decodes: a file is never held whole. Raises SampleError for what PIL cannot identify."""
    try:
        with open_image(data, max_pixels) as img:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except UnidentifiedImageError:
        # PIL's own message names the file's object; say what the data is instead.
        empty = len(data) == 0 if isinstance(data, bytes) else Path(data).stat().st_size == 0
        raise SampleError("empty file" if empty else "not an image format PIL reads") from None


def decode(data: Encoded, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """decode_rgb as a 3 × H × W uint8 tensor (a writable copy, as torch wants)."""
    return torch.from_numpy(np.array(decode_rgb(data, max_pixels))).permute(2, 0, 1)


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode an image file, or raise a UserError naming the file."""
    try:
        return decode(Path(path), max_pixels)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error...
        raise UserError(f"cannot read image {str(path)!r}: {reason(e)}") from None


# --- CIFAR (the official python-format batches) ---------------------------------------------

CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)

_CIFAR_LAYOUT = {
    # name: (directory, train files, eval files, meta file, label key, class-name key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        b"fine_labels",
        b"fine_label_names",
    ),
}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"CIFAR file {str(path)!r} is missing")
    return safeload.array_pickle(path, "CIFAR file")  # arrays only: a pickle may hold code


def cifar_dir(name: str, root: Path) -> Path:
    dirname = _CIFAR_LAYOUT[name][0]
    return root if (root / _CIFAR_LAYOUT[name][3]).is_file() else root / dirname


def _cifar_split(directory: Path, files: list[str], label_key: bytes) -> ArraySplit:
    batches = [_unpickle(directory / f) for f in files]
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return ArraySplit(torch.from_numpy(images), torch.from_numpy(labels))


def _download_cifar(name: str, root: Path) -> None:
    # torchvision's real download, for users with internet (tests never reach this).
    from torchvision import datasets

    builder = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    builder(str(root), train=True, download=True)


def load_cifar(name: str, cfg: DataConfig) -> Dataset:
    root = Path(cfg.root)
    directory = cifar_dir(name, root)
    dirname, train_files, eval_files, meta_file, label_key, names_key = _CIFAR_LAYOUT[name]
    if not (directory / meta_file).is_file():
        if not cfg.download:
            raise UserError(
                f"no {name} data in data.root={str(root)!r} (expected {dirname}/{meta_file}); "
                "set data.download=true to fetch it"
            )
        _download_cifar(name, root)
        directory = cifar_dir(name, root)
    classes = [c.decode() for c in _unpickle(directory / meta_file)[names_key]]
    return Dataset(
        name,
        _cifar_split(directory, train_files, label_key),
        _cifar_split(directory, eval_files, label_key),
        classes,
        CIFAR_MEAN,
        CIFAR_STD,
    )


# --- ImageFolder (ImageNet layout: train/<class>/*, val/<class>/*) ---------------------------

IMAGENET_MEAN = (123.7, 116.3, 103.5)
IMAGENET_STD = (58.4, 57.1, 57.4)


def _scan(split_dir: Path, classes: list[str], max_pixels: int) -> FileSplit:
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        found = sorted(
            p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        paths += found
        labels += [label] * len(found)
    return FileSplit(paths, labels, max_pixels)


def load_imagefolder(cfg: DataConfig) -> Dataset:
    root = Path(cfg.root)
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise UserError(
                f"data.root={str(root)!r} has no {d.name}/ directory "
                "(expected train/<class>/*.jpg and val/<class>/*.jpg)"
            )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{str(train_dir)!r} has no class directories")
    unknown = sorted({p.name for p in val_dir.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise UserError(f"val classes {unknown} are not among the train classes in {str(root)!r}")
    train, val = (_scan(d, classes, cfg.max_pixels) for d in (train_dir, val_dir))
    for split, d in ((train, train_dir), (val, val_dir)):
        if len(split) == 0:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(d)!r}")
    return Dataset("imagefolder", train, val, classes, IMAGENET_MEAN, IMAGENET_STD)


# --- synthetic ------------------------------------------------------------------------------


def load_synthetic(cfg: DataConfig) -> Dataset:
    """Each class is a smooth random colour pattern; samples add pixel noise and a brightness
    jitter. A model must learn the patterns to score, so accuracy measures learning."""
    g = torch.Generator().manual_seed(1234)  # the dataset is fixed; train.seed varies the run
    k, size = cfg.synthetic_classes, cfg.image_size
    templates = torch.nn.functional.interpolate(
        torch.rand(k, 3, 4, 4, generator=g) * 2 - 1, size=(size, size), mode="bilinear"
    )

    def make(n: int) -> ArraySplit:
        labels = torch.randint(0, k, (n,), generator=g)
        noise = torch.randn(n, 3, size, size, generator=g)
        jitter = torch.rand(n, 1, 1, 1, generator=g) * 40 - 20
        x = 128 + 70 * templates[labels] + 45 * noise + jitter
        return ArraySplit(x.clamp(0, 255).to(torch.uint8), labels)

    train, val = make(cfg.synthetic_train), make(cfg.synthetic_val)
    return Dataset(
        "synthetic", train, val, [f"class_{i}" for i in range(k)], (128.0,) * 3, (64.0,) * 3
    )


SOURCES: dict[str, Callable[[DataConfig], Dataset]] = {
    "cifar10": lambda cfg: load_cifar("cifar10", cfg),
    "cifar100": lambda cfg: load_cifar("cifar100", cfg),
    "imagefolder": load_imagefolder,
    "synthetic": load_synthetic,
}


def load(cfg: DataConfig) -> Dataset:
    if cfg.source not in SOURCES:
        raise UserError(f"data.source {cfg.source!r} is not one of {', '.join(SOURCES)}")
    return SOURCES[cfg.source](cfg)
