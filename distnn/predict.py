"""Classify images with a trained checkpoint.

    python -m distnn.predict --checkpoint runs/NAME IMG [IMG ...] [--topk 3]

`--checkpoint` takes a run directory (its latest checkpoint), a checkpoint file, or an export
(python -m distnn.checkpoint export: model.safetensors with its model.json). The file is data:
it is read by the safe loader, and the model it names is built only from the zoo, tv: and
timm:; a model of your own is named again with --model pkg.module:callable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from distnn import checkpoint_files, config, models, safeload
from distnn.data.sources import read_image
from distnn.data.transforms import EvalTransform
from distnn.errors import UserError, cli


class Predictor:
    """The model and preprocessing a checkpoint describes, ready for images."""

    def __init__(
        self, state: dict[str, Any], device: torch.device, model: torch.nn.Module | None = None
    ) -> None:
        """`model`: the architecture, for models of the user's own (the checkpoint's import
        path is never imported); others are rebuilt from the checkpoint's model.name (zoo, tv:
        or timm:) and model.kwargs."""
        cfg = config.from_dict(state["config"])  # checkpoints and exports both carry it
        self.classes: list[str] = list(state["classes"])
        self.size = cfg.data.image_size
        self.device = device
        if model is None:
            model = models.build_named(cfg.model.name, len(self.classes), self.size,
                                       cfg.model.kwargs)  # fmt: skip
        self.model = model
        self.model.load_state_dict(checkpoint_files.model_state(state))
        self.model.to(device).eval()
        self.transform = EvalTransform(self.size)
        self.mean = torch.tensor(state["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(state["std"], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def probabilities(self, paths: list[Path]) -> torch.Tensor:
        batch = torch.stack([self.transform(read_image(p)) for p in paths]).to(self.device)
        x = (batch.float() - self.mean) / self.std
        return self.model(x).float().softmax(dim=1).cpu()

    def top(self, paths: list[Path], k: int) -> list[list[tuple[str, float]]]:
        probs, idx = self.probabilities(paths).topk(min(k, len(self.classes)), dim=1)
        return [
            [(self.classes[i], p) for i, p in zip(row_i.tolist(), row_p.tolist(), strict=True)]
            for row_i, row_p in zip(idx, probs, strict=True)
        ]


def named_model(name: str | None, state: dict[str, Any]) -> torch.nn.Module | None:
    """The model the user named with --model; the checkpoint's kwargs go with it only where
    the user named the checkpoint's own callable."""
    if name is None:
        return None
    saved = state["config"]["model"]
    kwargs = saved.get("kwargs", {}) if name == saved["name"] else {}
    return models.build(name, len(state["classes"]), state["config"]["data"]["image_size"], kwargs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distnn.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint file or export")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--model", metavar="PKG.MODULE:CALLABLE",
        help="your own model's builder, where the checkpoint was trained with it: distnn never "
        "imports a name found in a file (the checkpoint's model.kwargs go to it only where it "
        "is the name the checkpoint holds)",
    )  # fmt: skip
    p.add_argument(
        "--trust", action="store_true",
        help="load a checkpoint the safe loader refuses (runs any code it names: only for "
        "files from people you trust)",
    )  # fmt: skip
    p.add_argument("images", nargs="+", type=Path)
    return p


@cli
def main(argv: list[str] | None = None) -> list[list[tuple[str, float]]]:
    args = parser().parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be >= 1, got {args.topk}")
    state = checkpoint_files.load_any(args.checkpoint, safeload.Trust("--trust", args.trust))
    predictor = Predictor(state, torch.device(args.device), model=named_model(args.model, state))
    results = predictor.top(args.images, args.topk)
    for path, top in zip(args.images, results, strict=True):
        ranked = ", ".join(f"{name} {p:.3f}" for name, p in top)
        # ImageFolder layout (<split>/<class>/<file>): the parent names the true class.
        truth = f"  (true: {path.parent.name})" if path.parent.name in predictor.classes else ""
        print(f"{path}: {ranked}{truth}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
