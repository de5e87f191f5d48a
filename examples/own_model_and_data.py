"""Train your own model on your own dataset with distnn, from a script.

    python examples/own_model_and_data.py run.name=mine train.epochs=3
    torchrun --nproc_per_node=2 examples/own_model_and_data.py run.name=mine

The same script runs on one process or many: distnn.fit finds the process group's shape in the
environment torchrun (or srun) sets. Arguments are dotted config overrides, as for
`python -m distnn.train`. Keep the work under `if __name__ == "__main__":` — data loader
workers may import this file.
"""

import os
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import distnn


class Stripes(Dataset):
    """Images of horizontal or vertical stripes, in any colour: the class is the direction."""

    classes = ("horizontal", "vertical")

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 2, n)
        self.colours = rng.integers(60, 256, (n, 3))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        stripes = (torch.arange(32) // 4 % 2).view(32, 1).expand(32, 32)
        if self.labels[i]:
            stripes = stripes.t()
        colour = torch.from_numpy(self.colours[i]).view(3, 1, 1)
        return (stripes * colour).to(torch.uint8), int(self.labels[i])  # CHW uint8


class TwoLayerNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten()
        )
        self.classifier = nn.Linear(16 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


if __name__ == "__main__":
    summary = distnn.fit(
        overrides=[
            *("run.name=own_model", "train.epochs=2", "train.batch_size=32", "optim.lr=0.05"),
            *sys.argv[1:],  # the command line's overrides win
        ],
        model=TwoLayerNet,
        train_data=Stripes(512, seed=0),
        val_data=Stripes(128, seed=1),
    )
    if os.environ.get("RANK", "0") == "0":  # every rank returns the summary; one prints
        print(f"val top-1 {summary['val_top1']:.3f} after {summary['steps']} steps")
