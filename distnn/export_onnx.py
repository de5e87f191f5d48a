"""A checkpoint as an ONNX model for serving, checked against torch at export.

    python -m distnn.checkpoint export RUN model.onnx

torch.onnx's dynamo exporter (onnx and onnxscript: pip install 'distnn[onnx]') writes the model
in eval mode, fp32, with a dynamic batch dimension: input `image`, N × 3 × S × S float32,
already normalised; output `logits`, N × classes. The `.json` beside it says how to get there
from pixels (the eval transform, mean and std) and holds the classes and the run's config, as
the safetensors export's does, so `python -m distnn.predict --checkpoint model.onnx` runs it
through onnxruntime. At export onnxruntime runs a batch and its logits are compared with
torch's: the largest difference is written in the `.json`, and an export that differs by more
than TOLERANCE is refused (no file is left).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distnn import checkpoint_files, fsio, models, safeload
from distnn.checkpoint_files import UNTRUSTED
from distnn.data.augment import SMALL
from distnn.data.transforms import EVAL_CROP
from distnn.errors import UserError

TOLERANCE = 1e-3  # max |logit difference|, fp32 torch vs onnxruntime on CPU
PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def _require() -> None:
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"ONNX needs {', '.join(missing)}: pip install 'distnn[onnx]'")


def preprocessing(state: dict[str, Any]) -> dict[str, Any]:
    """What a server does to an RGB image before the model, as the eval transform does it."""
    size = state["config"]["data"]["image_size"]
    if size <= SMALL:
        resize = f"resize to {size} × {size} (antialiased) unless the image is already that size"
    else:
        resize = (f"resize the shorter side to {round(size / EVAL_CROP)} (bilinear, "
                  f"antialiased), then centre-crop {size} × {size}")  # fmt: skip
    return {
        "input": "image: N × 3 × H × W float32, RGB, channels first",
        "steps": [resize, "x = (pixel (0-255) - mean) / std, per channel"],
        "image_size": size,
        "mean": list(state["mean"]),
        "std": list(state["std"]),
        "output": "logits: N × classes; softmax for probabilities",
    }


class Session(torch.nn.Module):
    """An ONNX model run by onnxruntime where Predictor runs a torch model (CPU, fp32)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        _require()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input: x.detach().float().contiguous().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)


def export(
    source: str | Path, out: Path, ema: bool | None = None, trust: safeload.Trust = UNTRUSTED
) -> dict[str, Any]:
    """Write OUT (.onnx) and OUT with .json from a checkpoint or run (`ema`: as the
    safetensors export); what the .json holds."""
    _require()
    state = checkpoint_files.load_file(source, trust)
    cfg, classes = state["config"], list(state["classes"])
    if ema is None:
        ema = cfg["ckpt"].get("export_ema", False)
    size = cfg["data"]["image_size"]
    model = models.build_named(cfg["model"]["name"], len(classes), size, cfg["model"]["kwargs"])
    model.load_state_dict(checkpoint_files.model_state(state, ema))
    model.eval()
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's own notes on its progress
        program = torch.onnx.export(
            model, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )  # fmt: skip
        program.save(str(tmp))
        expected = model(x).numpy()
    try:
        got = Session(tmp)(x).numpy()
        diff = float(np.abs(got - expected).max())
        if not diff <= TOLERANCE:
            raise UserError(
                f"onnxruntime's logits differ from torch's by up to {diff:.3g} (over "
                f"{TOLERANCE:g}) for model {cfg['model']['name']}: not exported"
            )
        fsio.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "model": cfg["model"]["name"], "format": "onnx", "weights": "ema" if ema else "model",
        "num_classes": len(classes), "image_size": size, "classes": classes,
        "mean": list(state["mean"]), "std": list(state["std"]),
        "preprocessing": preprocessing(state), "max_abs_diff": diff, "config": cfg,
    }  # fmt: skip
    fsio.write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return meta
