"""Reading a checkpoint: a run directory's latest, a file, or a strategy's directory of
shards, through the safe loader (safeload.py); the plain model weights inside one, and their
export as safetensors. Training (checkpoint.py), export, predict and `model.init_from` all read
checkpoints here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from distnn import fsio, safeload
from distnn.errors import UserError
from distnn.parallel import formats

NAME = re.compile(r"^step_(\d{8})(\.pt)?$")


def step_of(name: str) -> int:
    """The step of a checkpoint's name (NAME)."""
    return int(NAME.match(name).group(1))


STATE = "state.pt"  # in a directory checkpoint: everything but the shards
# What library callers get unless they say otherwise: the safe loader alone.
UNTRUSTED = safeload.Trust("trust=safeload.Trust(..., granted=True)")


def latest(run_dir: Path) -> Path:
    """The checkpoint a run directory's `checkpoints/latest` names: one of its own steps,
    never a path elsewhere (the pointer is a file like any other, and may come from
    elsewhere too)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        raise UserError(f"{str(run_dir)!r} holds no checkpoints/latest")
    name = pointer.read_text().strip()
    if not NAME.match(name):
        raise UserError(
            f"{str(pointer)!r} names {name!r}, not a checkpoint of this run "
            "(step_NNNNNNNN or step_NNNNNNNN.pt)"
        )
    return pointer.parent / name


def load_file(path: str | Path, trust: safeload.Trust = UNTRUSTED) -> dict[str, Any]:
    """A checkpoint file or directory, or a run directory's latest checkpoint, read by the
    safe loader (safeload.py): where it needs more, and where it is a strategy's directory
    that only an unpickler reads (DeepSpeed's), `trust` must cover it."""
    path = Path(path)
    if path.is_dir() and not (path / STATE).is_file():
        path = latest(path)
    shards = path if (path / STATE).is_file() else None
    file = path / STATE if shards else path
    if not file.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    state = safeload.torch_file(file, trust)
    strategy = state.get("strategy") if isinstance(state, dict) else None
    if isinstance(strategy, dict):
        strategy.pop("shards", None)  # a path stored in the file is never followed
        if shards is not None:  # the strategy finds its shards where the state was read
            form = formats.of(strategy)
            if form.pickled:
                safeload.require(shards, trust, form.pickled)
            strategy["shards"] = str(shards)
            form.verify(shards)
    return state


def model_state(state: dict[str, Any], ema: bool = False) -> dict[str, torch.Tensor]:
    """The plain model state_dict inside a checkpoint (or an export, which is only that);
    from sharded checkpoints, consolidated in fp32. `ema`: the EMA of the weights instead."""
    if "strategy" not in state:
        return state["model"]
    strategy = state["strategy"]
    if ema and strategy.get("ema") is not None:
        return strategy["ema"]
    if "shards" in strategy:
        return formats.of(strategy).consolidate(strategy["shards"], "ema" if ema else "model")
    if ema:
        raise UserError("the checkpoint holds no EMA weights (its run had train.ema_decay=0)")
    return strategy["model"]


def export(
    source: str | Path, out: str | Path, ema: bool | None = None, trust: safeload.Trust = UNTRUSTED
) -> Path:
    """The model's weights at OUT (`.safetensors`: tensors and nothing else, loading strict
    into the zoo or torchvision builder) and OUT with .json: what predict needs to rebuild the
    model and its preprocessing. `ema`: the EMA of the weights rather than the weights
    (default: the run's ckpt.export_ema)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(
            f"export writes safetensors or ONNX: name the output *.safetensors or *.onnx, not {out}"
        )
    state = load_file(source, trust)
    cfg = state["config"]
    if ema is None:
        ema = cfg["ckpt"].get("export_ema", False)
    out.parent.mkdir(parents=True, exist_ok=True)
    safeload.save_tensors(model_state(state, ema), out)
    meta = {
        "model": cfg["model"]["name"],
        "weights": "ema" if ema else "model",
        "num_classes": len(state["classes"]),
        "image_size": cfg["data"]["image_size"],
        "classes": list(state["classes"]),
        "mean": list(state["mean"]),
        "std": list(state["std"]),
        "config": cfg,
    }
    fsio.write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return out


def load_any(path: str | Path, trust: safeload.Trust = UNTRUSTED) -> dict[str, Any]:
    """A checkpoint or run dir (load_file), or an export: its weights (`.safetensors`, or a
    `.pt` of earlier versions) with the `.json` beside them."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise UserError(f"{str(meta_path)!r} is not JSON: {e}") from None
        if path.suffix == ".safetensors":
            return {**meta, "model": safeload.safetensors_file(path)}
        if path.suffix == ".onnx":  # run by onnxruntime (export_onnx.Session), not loaded here
            return {**meta, "onnx": str(path)}
        return {**meta, "model": safeload.torch_file(path, trust, "export")}
    state = None if path.suffix == ".safetensors" else load_file(path, trust)
    if not (isinstance(state, dict) and "strategy" in state):
        raise UserError(
            f"{str(path)!r} holds weights only, and no {meta_path.name} beside it says which "
            "model and classes they are for: give a run directory, a checkpoint, or an export "
            "(python -m distnn.checkpoint export RUN OUT.safetensors writes both)"
        )
    return state
