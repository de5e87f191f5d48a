"""Checkpoints: atomic files, a `latest` pointer written last, the newest `keep` kept.

A checkpoint is one torch file holding every stateful piece of the run (the strategy's model,
optimizer, scheduler and scaler; the loop position; each rank's RNG state) plus the resolved
config, so it alone can rebuild the model (predict, export) or continue the run exactly.
Where the strategy shards its state over the ranks (DeepSpeed ZeRO) a checkpoint is a
directory instead: the same file as `state.pt` beside every rank's shards, written under a
temporary name and renamed into place once all ranks are done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as td

from distnn.config import CkptConfig, Config
from distnn.errors import UserError, cli
from distnn.parallel.dist import barrier

_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")
STATE = "state.pt"  # in a directory checkpoint: everything but the shards


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (dropout masks differ per rank)."""
    mine = rng_state()
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [mine]
    states: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(states, mine)
    return states


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary name in the same directory, fsync, rename: a crash leaves either
    the old file or the new one, never a truncated file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)


def _replace(tmp: Path, path: Path) -> None:
    """Rename into place and fsync the directory, so the rename itself survives a crash."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint file or directory, or a run directory's latest checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / STATE).is_file():
        latest = path / "checkpoints" / "latest"
        if not latest.is_file():
            raise UserError(f"{str(path)!r} holds no checkpoints/latest")
        path = latest.parent / latest.read_text().strip()
    shards = path if (path / STATE).is_file() else None
    file = path / STATE if shards else path
    if not file.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only=False: the checkpoint holds RNG states and numpy arrays, and is our own.
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {str(path)!r} cannot be read: {type(e).__name__}") from None
    if shards is not None:  # the strategy finds its shards where the state was read
        state["strategy"]["shards"] = str(shards)
    return state


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    for p in [*root.rglob("*"), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Manager:
    def __init__(self, cfg: CkptConfig, run_dir: Path, writes: bool) -> None:
        self.cfg = cfg
        self.dir = Path(run_dir) / "checkpoints"
        self.writes = writes
        self.last_saved_step = -1
        self.best_value: float | None = None
        self.restored_from: Path | None = None

    def path(self, step: int, sharded: bool = False) -> Path:
        return self.dir / (f"step_{step:08d}" if sharded else f"step_{step:08d}.pt")

    def improves(self, metrics: dict[str, float]) -> bool:
        """Whether these eval metrics beat the best so far (and remember them if so)."""
        value = metrics.get(self.cfg.best_metric)
        if value is None or not math.isfinite(value):
            return False
        better = max if self.cfg.best_mode == "max" else min
        if self.best_value is not None and better(value, self.best_value) == self.best_value:
            return False
        self.best_value = value
        return True

    def save(
        self,
        state: dict[str, Any],
        step: int,
        best: bool = False,
        save_shards: Callable[[Path], None] | None = None,
    ) -> Path | None:
        """Rank 0 writes; all ranks must call (RNG states are gathered from every rank, and
        `save_shards`, the strategy's, has every rank write its part into the directory)."""
        state = {**state, "rng": gather_rng_states(), "best_value": self.best_value}
        self.last_saved_step = step
        path = self.path(step, sharded=save_shards is not None)
        if save_shards is not None:
            self._save_directory(state, path, save_shards)
        elif self.writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_save(state, path)
        if not self.writes:
            return None
        atomic_write_text(path.name + "\n", self.dir / "latest")
        if best:
            self._mark_best(path)
        for old in self.saved()[: -self.cfg.keep]:
            _remove(old)
        return path

    def _save_directory(
        self, state: dict[str, Any], path: Path, save_shards: Callable[[Path], None]
    ) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        if self.writes:
            _remove(tmp)  # left by a crash mid-save
            tmp.mkdir(parents=True)
        barrier()
        save_shards(tmp)
        barrier()  # every rank's files are closed (on NFS: flushed to the server)
        if self.writes:
            atomic_save(state, tmp / STATE)
            _fsync_tree(tmp)
            _remove(path)  # the same step saved again (best after the epoch's checkpoint)
            _replace(tmp, path)
        barrier()  # no rank returns (and maybe exits) before the checkpoint is in place

    def _mark_best(self, path: Path) -> None:
        """best.pt (or best/) as hard links: no copy, and pruning the step leaves it intact."""
        best = self.dir / ("best" if path.is_dir() else "best.pt")
        tmp = self.dir / f".{best.name}.tmp"
        _remove(tmp)
        if path.is_dir():
            shutil.copytree(path, tmp, copy_function=os.link)
            _remove(best)  # a directory cannot be renamed over a non-empty one
        else:
            os.link(path, tmp)
        os.replace(tmp, best)

    def saved(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if _NAME.match(p.name))

    def restore(self) -> dict[str, Any] | None:
        """The checkpoint `ckpt.resume` names: none for `never`, the newest readable one in
        this run for `auto` (skipping unreadable ones with a warning), or a given path.
        Checkpoints in this run past the step it continues from are removed: they belong to
        an attempt that was lost (or to the run that `never` starts over)."""
        state = None if self.cfg.resume == "never" else self._load()
        if self.writes:
            self._forget_after(state["position"]["step"] if state else 0)
        return state

    def _load(self) -> dict[str, Any] | None:
        candidates = [Path(self.cfg.resume)] if self.cfg.resume != "auto" else []
        for path in candidates or reversed(self.saved()):
            try:
                state = load_file(path)
            except UserError as e:
                if candidates:
                    raise
                warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
                continue
            self.restored_from = path
            self.best_value = state.get("best_value")
            return state
        return None

    def _forget_after(self, step: int) -> None:
        stale = [p for p in self.saved() if int(_NAME.match(p.name).group(1)) > step]
        if step == 0:
            stale += [self.dir / name for name in ("best.pt", "best", "latest")]
        for p in stale:
            _remove(p)


def check_compatible(
    state: dict[str, Any], cfg: Config, classes: list[str], path: Path | None, world_size: int
) -> None:
    """A checkpoint of another model or dataset cannot continue this run: say which key.
    Sharded state (ZeRO) also needs the world size that wrote it."""
    saved = state["config"]
    checks = [
        ("model.name", cfg.model.name, saved["model"]["name"]),
        ("data.image_size", cfg.data.image_size, saved["data"]["image_size"]),
        ("number of classes", len(classes), len(state["classes"])),
    ]
    if "shards" in state["strategy"]:
        checks.append(("processes", world_size, state["strategy"]["world_size"]))
    for key, now, then in checks:
        if now != then:
            raise UserError(
                f"checkpoint {str(path)!r} was trained with {key}={then}, this run has {now}; "
                "use another run.name or ckpt.resume=never"
            )


def restore_rng(state: dict[str, Any], rank: int) -> None:
    states = state["rng"]
    if rank < len(states):
        set_rng_state(states[rank])


def model_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The plain model state_dict inside a checkpoint (or an export, which is only that);
    from sharded checkpoints, consolidated in fp32."""
    if "strategy" not in state:
        return state["model"]
    if "shards" in state["strategy"]:
        from distnn.parallel.deepspeed import consolidate

        return consolidate(state["strategy"]["shards"])
    return state["strategy"]["model"]


def export(source: str | Path, out: str | Path) -> Path:
    """A plain model state_dict at OUT (loads strict into the zoo or torchvision builder) and
    OUT with .json: what predict needs to rebuild the model and its preprocessing."""
    state = load_file(source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(model_state(state), out)
    cfg = state["config"]
    meta = {
        "model": cfg["model"]["name"],
        "num_classes": len(state["classes"]),
        "image_size": cfg["data"]["image_size"],
        "classes": list(state["classes"]),
        "mean": list(state["mean"]),
        "std": list(state["std"]),
        "config": cfg,
    }
    atomic_write_text(json.dumps(meta, indent=2) + "\n", out.with_suffix(".json"))
    return out


def load_any(path: str | Path) -> dict[str, Any]:
    """A checkpoint or run dir (load_file), or an export with its .json beside it."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return {**meta, "model": load_file(path)}
    return load_file(path)


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distnn.checkpoint")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a plain state_dict (+ .json) from a checkpoint")
    ex.add_argument("source", help="run directory or checkpoint file")
    ex.add_argument("out", help="output .pt path")
    args = p.parse_args(argv)
    out = export(args.source, args.out)
    print(f"exported {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
