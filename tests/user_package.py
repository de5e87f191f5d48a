"""A user's own package, written outside the repo: a model class and a dataset class.

The model has no BatchNorm and no dropout, so N ranks × batch b equals 1 rank × N·b exactly;
the dataset yields PIL images (class = the bright channel, on noise) with `classes`.
"""

from __future__ import annotations

from pathlib import Path

NETS = """
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, num_classes, width=16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


class ReadsItsWeights(SmallNet):
    # Reads a value while it is built: meta tensors have none.
    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.scale = float(self.head.weight.abs().max())


def broken(num_classes, **kwargs):
    raise RuntimeError("no weights for you")


def not_a_model(num_classes, **kwargs):
    return {"num_classes": num_classes}
"""

DATA = """
import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class Channels(Dataset):
    classes = ["red", "green", "blue", "grey"]

    def __init__(self, split, root, n=256):
        rng = np.random.default_rng(0 if split == "train" else 1)
        self.labels = rng.integers(0, 4, n)
        self.seeds = rng.integers(0, 2**31, n)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = np.random.default_rng(self.seeds[i]).integers(0, 110, (32, 32, 3), dtype=np.uint8)
        c = int(self.labels[i])
        if c < 3:
            img[..., c] += 120
        else:
            img += 60
        return Image.fromarray(img), c
"""


def write(root: Path) -> Path:
    """root/userpkg/{__init__,nets,data}.py; put root on PYTHONPATH to use it."""
    pkg = Path(root) / "userpkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    (pkg / "data.py").write_text(DATA)
    return Path(root)
