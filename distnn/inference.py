"""What prediction and evaluation share: the model a checkpoint describes, ready for batches
(precision, channels_last, test-time augmentation), and the samples to run it on — image
files, or any source training reads, named with training's own `data.*` keys.

Both run on any number of ranks: the samples are cut into parts (data/order.py `Parts`), each
rank reads its parts through training's one Reader with the eval transform, and every sample
is scored once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distnn import checkpoint_files, config, data, models
from distnn import precision as precision_lib
from distnn.config import Config
from distnn.data.errors import DataErrors
from distnn.data.order import Parts
from distnn.data.prefetch import DevicePrefetcher
from distnn.data.sources import IMAGE_EXTENSIONS, FileSplit, Split, read_image
from distnn.data.transforms import EVAL_CROP, EvalTransform
from distnn.errors import UserError
from distnn.parallel.env import Env


def _five_crop(x: torch.Tensor) -> list[torch.Tensor]:
    """The batch enlarged by 1 / EVAL_CROP, cut at its four corners and its centre."""
    s = x.shape[-1]
    big = F.interpolate(x, size=round(s / EVAL_CROP), mode="bilinear", antialias=True)
    b, c = big.shape[-1] - s, (big.shape[-1] - s) // 2
    return [big[..., i : i + s, j : j + s] for i, j in ((0, 0), (0, b), (b, 0), (b, b), (c, c))]


# Test-time augmentation: the views a batch is scored on (their probabilities averaged).
TTA: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {
    "none": lambda x: [x],
    "hflip": lambda x: [x, x.flip(-1)],
    "five-crop": _five_crop,
}


class Predictor:
    """The model and preprocessing a checkpoint (or export) describes, ready for batches."""

    def __init__(
        self,
        state: dict[str, Any],
        device: torch.device,
        model: torch.nn.Module | None = None,
        precision: str | None = None,
        channels_last: bool = False,
        tta: str = "none",
        ema: bool = False,
    ) -> None:
        """`model`: the architecture, for models of the user's own (the checkpoint's import
        path is never imported); others are rebuilt from the checkpoint's model.name (zoo, tv:
        or timm:) and model.kwargs. `precision`: default the checkpoint's."""
        if tta not in TTA:
            raise UserError(f"--tta {tta!r} is not one of {', '.join(TTA)}")
        self.cfg = config.from_dict(state["config"])  # checkpoints and exports both carry it
        self.classes: list[str] = list(state["classes"])
        self.size = self.cfg.data.image_size
        self.device = device
        if "onnx" in state:
            from distnn.export_onnx import Session  # onnxruntime: only for an ONNX export

            model = Session(state["onnx"])
        elif model is None:
            model = models.build_named(self.cfg.model.name, len(self.classes), self.size,
                                       self.cfg.model.kwargs)  # fmt: skip
        if "onnx" not in state:
            model.load_state_dict(checkpoint_files.model_state(state, ema))
        model.to(device).eval()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last = channels_last
        self.precision = precision_lib.build(precision or self.cfg.precision, device)
        self.mean: tuple[float, float, float] = tuple(state["mean"])
        self.std: tuple[float, float, float] = tuple(state["std"])
        self.views = TTA[tta]

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """N × classes log-probabilities (fp32) of a normalised batch on the device: the mean
        of the probabilities over the test-time views."""
        views = self.views(x)
        logps = []
        for view in views:
            with self.precision.autocast():
                logits = self.model(view)
            logps.append(logits.float().log_softmax(dim=1))
        if len(logps) == 1:
            return logps[0]
        return torch.stack(logps).logsumexp(dim=0) - torch.log(torch.tensor(float(len(logps))))

    def probabilities(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """N × classes probabilities of image files, on the host (for a script's few images;
        datasets go through `batches`)."""
        transform = EvalTransform(self.size)
        x = torch.stack([transform(read_image(Path(p))) for p in paths]).to(self.device)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return self.log_probs((x.float() - mean) / std).exp().cpu()

    def batches(
        self, loader: data.errors.PolicyLoader
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(log-probabilities, labels, sample indices) of each of the loader's batches."""
        prefetch = DevicePrefetcher(loader, self.device, self.mean, self.std, self.channels_last)
        for x, y, index in prefetch:
            yield self.log_probs(x), y, index


@dataclass
class Inputs:
    """The samples to predict: a split of any source (label -1: unknown) and its name."""

    split: Split
    source: str
    cfg: Config  # the checkpoint's config with the user's overrides: the loader's settings


def _image_files(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*")
                            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())  # fmt: skip
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"{str(p)!r} is neither an image file nor a directory")
    if not found:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(paths)}")
    return found


def _few(names: list[str]) -> str:
    return str(names[:5])[:-1] + (", …]" if len(names) > 5 else "]")


def open_inputs(
    items: Sequence[str], state: dict[str, Any], env: Env, split: str = "val"
) -> Inputs:
    """`items`: image files and directories (recursively; a file whose directory is named
    after a class is labelled with it), or training's dotted keys naming a source
    (`data.source=imagefolder data.root=DIR`; none: the checkpoint's own data). Other keys
    (data.workers, data.on_error, ...) apply to either."""
    overrides = [i for i in items if "=" in i]
    paths = [i for i in items if "=" not in i]
    cfg = config.for_world(
        config.load(config.from_dict(state["config"]), overrides),
        env.world_size, env.local_world_size,
    )  # fmt: skip
    classes = list(state["classes"])
    if paths:
        naming = [o.split("=", 1)[0] for o in overrides
                  if o.startswith(("data.source=", "data.root="))]  # fmt: skip
        if naming:
            raise UserError(f"{' and '.join(naming)} name a source, and image paths were given "
                            "too: give one or the other")  # fmt: skip
        files = _image_files(paths)
        index = {c: k for k, c in enumerate(classes)}
        labels = [index.get(f.parent.name, -1) for f in files]
        return Inputs(FileSplit(files, labels, cfg.data.max_pixels), "files", cfg)
    ds = data.open_dataset(cfg, env)
    if split not in ("train", "val"):
        raise UserError(f"--split {split!r} is not train or val")
    if ds.classes != classes:
        raise UserError(
            f"data.source={ds.name} has {len(ds.classes)} classes {_few(ds.classes)}; the "
            f"checkpoint was trained on {len(classes)} classes {_few(classes)}"
        )
    return Inputs(getattr(ds, split), ds.name, cfg)


def loader(
    inputs: Inputs, batch_size: int, part: int, env: Env, errors: DataErrors,
    done: frozenset[int] = frozenset(), pin_memory: bool = False,
) -> tuple[data.errors.PolicyLoader, Parts]:  # fmt: skip
    """This rank's batches of the parts not in `done`, and the order that deals them."""
    order = Parts(len(inputs.split), batch_size, part, env.world_size, env.rank, done)
    return data.eval_loader(inputs.split, inputs.source, inputs.cfg, order, errors,
                            pin_memory), order  # fmt: skip
