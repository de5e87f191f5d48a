"""Checkpoints: atomic files, a `latest` pointer written last, the newest `keep` kept.

A checkpoint is one torch file holding every stateful piece of the run (the strategy's model,
optimizer, scheduler and scaler; the loop position; each rank's RNG state) plus the resolved
config, so it alone can rebuild the model (predict, export) or continue the run exactly.
Where the strategy shards its state over the ranks (FSDP, DeepSpeed ZeRO) a checkpoint is a
directory instead: the same file as `state.pt` beside every rank's shards in the strategy's
format (parallel/formats.py), written under a temporary name and renamed into place once all
ranks are done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as td

from distnn import fsio, safeload
from distnn.checkpoint_files import NAME, STATE, UNTRUSTED, load_file, model_state
from distnn.config import CkptConfig, Config, global_batch
from distnn.errors import UserError, cli, reason
from distnn.parallel import formats
from distnn.parallel.dist import barrier


def rng_state() -> dict[str, Any]:
    """This process's generators; on CUDA only its own device's, which is all it draws from
    (a resumed rank may see fewer GPUs, or its GPU under another index)."""
    return {
        "python": random.getstate(),
        # As a list: the safe loader takes numpy arrays only by name (older checkpoints).
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    # A CPU run's checkpoint has no CUDA state; a GPU run's resumed on CPU has no use for it.
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device: this rank's


def _gather(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [obj]
    objs: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(objs, obj)
    return objs


class RankRNG:
    """Every rank's random generators as one stateful piece of a checkpoint: saved in rank
    order (a collective: dropout masks differ per rank), each rank restoring its own; a rank
    beyond those saved (a larger world) keeps its seeding."""

    def state_dict(self) -> list[dict[str, Any]]:
        return _gather(rng_state())

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        rank = td.get_rank() if td.is_initialized() else 0
        if rank < len(states):
            set_rng_state(states[rank])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, whole or not at all (fsio.atomic_open)."""
    with fsio.atomic_open(path, "wb") as f:
        torch.save(obj, f)


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
        # The run's own checkpoints (it holds the run directory's lock) load in every form;
        # what the safe loader refuses needs the user's word, wherever it is.
        self.trust = safeload.Trust("ckpt.resume_trusted=true", cfg.resume_trusted, own=self.dir)
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
        """Rank 0 writes; all ranks must call (`save_shards`, the strategy's, has every rank
        write its part into the directory)."""
        state = {**state, "best_value": self.best_value}
        self.last_saved_step = step
        path = self.path(step, sharded=save_shards is not None)
        if save_shards is not None:
            self._save_directory(state, path, save_shards)
        elif self.writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_save(state, path)
        if not self.writes:
            return None
        fsio.write_text(self.dir / "latest", path.name + "\n")
        if best:
            self._mark_best(path)
        for old in self.saved()[: -self.cfg.keep]:
            fsio.remove(old)
        return path

    def _save_directory(
        self, state: dict[str, Any], path: Path, save_shards: Callable[[Path], None]
    ) -> None:
        tmp = _gather(fsio.temp_path(path))[0]  # rank 0's fresh name, where every rank writes

        def prepare() -> None:
            if self.writes:
                self.dir.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()  # exclusive: never an existing directory, nor through a symlink

        def finish() -> None:
            if self.writes:
                with open(tmp / STATE, "wb") as f:  # the directory goes into place whole
                    torch.save(state, f)
                _fsync_tree(tmp)
                fsio.remove(path)  # the same step saved again (best after the epoch's checkpoint)
                fsio.replace(tmp, path)

        self._together(prepare, path, tmp)
        # After the shards: every rank's files are closed (on NFS: flushed to the server).
        self._together(lambda: save_shards(tmp), path, tmp)
        # No rank returns (and maybe exits) before the checkpoint is in place.
        self._together(finish, path, tmp)

    def _together(self, part: Callable[[], None], path: Path, tmp: Path) -> None:
        """This rank's part of a directory save, then every rank waits for the others and
        learns whether a write failed anywhere (a full disk): if so, every rank raises the
        first failure's line and the temporary directory goes. A rank that gave up alone
        would leave the others waiting for it until the timeout."""
        try:
            with fsio.reporting(path):
                part()
            error = None
        except UserError as e:
            error = str(e)
        except Exception as e:  # a write that failed some other way still ends every rank
            error = f"cannot write {path}: {reason(e)}"
        error = next((e for e in _gather(error) if e is not None), None)
        if error is not None:
            if self.writes:
                fsio.remove(tmp)
            barrier()  # as one rank exits, torchrun stops the others: rank 0 has cleaned up
            raise UserError(error)

    def _mark_best(self, path: Path) -> None:
        """best.pt (or best/) as hard links: no copy, and pruning the step leaves it intact."""
        best = self.dir / ("best" if path.is_dir() else "best.pt")
        tmp = fsio.temp_path(best)  # fresh; os.link and copytree create it exclusively
        with fsio.reporting(best, partial=tmp):  # links take space too (directory entries)
            if path.is_dir():
                shutil.copytree(path, tmp, copy_function=os.link)
                fsio.remove(best)  # a directory cannot be renamed over a non-empty one
            else:
                os.link(path, tmp)
            os.replace(tmp, best)

    def saved(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if NAME.match(p.name))

    def restore(self) -> dict[str, Any] | None:
        """The checkpoint `ckpt.resume` names: none for `never`, the newest readable one in
        this run for `auto` (skipping unreadable ones with a warning), or a given path.
        Reads only: `discard_lost` removes what the run will not continue from."""
        return None if self.cfg.resume == "never" else self._load()

    def discard_lost(self, state: dict[str, Any] | None) -> None:
        """Checkpoints in this run past the step it continues from (`state`'s) are removed:
        they belong to an attempt that was lost (or to the run that `never` starts over)."""
        if self.writes:
            self._forget_after(state["position"]["step"] if state else 0)
            # What writers killed mid-write left (the run holds its directory's lock).
            for partial in [*self.dir.glob(".*.tmp"), *self.dir.parent.glob(".*.tmp")]:
                fsio.remove(partial)

    def _load(self) -> dict[str, Any] | None:
        candidates = [Path(self.cfg.resume)] if self.cfg.resume != "auto" else []
        for path in candidates or reversed(self.saved()):
            try:
                state = load_file(path, self.trust)
            except UserError as e:
                if candidates:
                    raise
                warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
                continue
            self.restored_from = path
            self.best_value = state.get("best_value")
            self.last_saved_step = state["position"]["step"]  # saving it again changes nothing
            return state
        return None

    def _forget_after(self, step: int) -> None:
        stale = [p for p in self.saved() if int(NAME.match(p.name).group(1)) > step]
        if step == 0:
            stale += [self.dir / name for name in ("best.pt", "best", "latest")]
        for p in stale:
            fsio.remove(p)


def check_compatible(
    state: dict[str, Any], cfg: Config, classes: list[str], path: Path | None, world_size: int
) -> None:
    """A checkpoint of another model or dataset cannot continue this run: say which key.
    Sharded state (ZeRO) also needs the world size that wrote it."""
    saved = state["config"]
    checks = [
        ("model.name", cfg.model.name, saved["model"]["name"]),
        ("model.kwargs", cfg.model.kwargs, saved["model"].get("kwargs", {})),
        # The optimizer's parameter groups follow these: another split cannot load its state.
        ("model.freeze", cfg.model.freeze, saved["model"].get("freeze", [])),
        ("model.head", cfg.model.head, saved["model"].get("head", "")),
        ("optim.head_lr_scale", cfg.optim.head_lr_scale, saved["optim"].get("head_lr_scale", 1.0)),
        ("optim.layer_decay", cfg.optim.layer_decay, saved["optim"].get("layer_decay", 1.0)),
        ("optim.name", cfg.optim.name, saved["optim"]["name"]),
        ("data.image_size", cfg.data.image_size, saved["data"]["image_size"]),
        ("number of classes", len(classes), len(state["classes"])),
    ]
    strategy = state["strategy"]
    if "shards" in strategy and not formats.of(strategy).any_world_size:
        then = strategy["world_size"]
        if then != world_size:
            raise UserError(
                f"checkpoint {str(path)!r} holds {strategy['format']} shards of processes={then}, "
                f"this run has {world_size}: they load only at the world size that wrote them; "
                f"resume on {then} processes (FSDP and DDP checkpoints load at any world size)"
            )
    for key, now, then in checks:
        if now != then:
            raise UserError(
                f"checkpoint {str(path)!r} was trained with {key}={then}, this run has {now}; "
                "use another run.name or ckpt.resume=never"
            )


def resume_notes(state: dict[str, Any], cfg: Config, world_size: int) -> list[str]:
    """What makes this resume differ from the uninterrupted run, one line each. Every source,
    shards included, orders samples by global batch (data/order.py) whatever data.workers is:
    at another world size the same global batches follow where the global batch and
    accum_steps are kept."""
    then = state.get("world_size", len(state["rng"]))  # older checkpoints: one RNG per rank
    notes = []
    if then != world_size:
        saved = state["config"]["train"]
        before = saved["batch_size"] * saved["accum_steps"] * then
        after = global_batch(cfg, world_size)
        head = f"note: the checkpoint was written by {then} processes, this run has {world_size}"
        if before == after and saved["accum_steps"] == cfg.train.accum_steps:
            notes.append(
                f"{head}: the same global batches of {after} follow, so it continues the "
                "uninterrupted run (up to reduction order; each rank's random streams, such as "
                "dropout, and its BatchNorm statistics differ)"
            )
        else:
            detail = (
                f"the global batch changes from {before} to {after}"
                if before != after
                else "train.accum_steps changes"
            )
            notes.append(
                f"{head}: it continues, but not exactly as an uninterrupted run ({detail}); "
                f"resume on {then} processes for that"
            )
        if cfg.train.mixup_alpha or cfg.train.cutmix_alpha:
            notes.append(
                "note: MixUp/CutMix pair samples within each process's micro-batch: at another "
                "world size the pairs, and so the loss curve, differ"
            )
    if cfg.train.ema_decay and not state["config"]["train"].get("ema_decay"):
        notes.append("note: the checkpoint holds no EMA: it starts from the resumed weights")
    return notes


def export(
    source: str | Path, out: str | Path, ema: bool | None = None, trust: safeload.Trust = UNTRUSTED
) -> Path:
    """The model's weights at OUT (`.safetensors`: tensors and nothing else, loading strict
    into the zoo or torchvision builder) and OUT with .json: what predict needs to rebuild the
    model and its preprocessing. `ema`: the EMA of the weights rather than the weights
    (default: the run's ckpt.export_ema)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"export writes safetensors: name the output *.safetensors, not {out}")
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
        return {**meta, "model": safeload.torch_file(path, trust, "export")}
    state = None if path.suffix == ".safetensors" else load_file(path, trust)
    if not (isinstance(state, dict) and "strategy" in state):
        raise UserError(
            f"{str(path)!r} holds weights only, and no {meta_path.name} beside it says which "
            "model and classes they are for: give a run directory, a checkpoint, or an export "
            "(python -m distnn.checkpoint export RUN OUT.safetensors writes both)"
        )
    return state


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distnn.checkpoint")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "export", help="write the weights as safetensors (+ .json) from a checkpoint"
    )
    ex.add_argument("source", help="run directory or checkpoint file")
    ex.add_argument("out", help="output .safetensors path (the .json goes beside it)")
    ex.add_argument(
        "--weights",
        choices=("model", "ema"),
        help="the weights, or their EMA (default: the run's ckpt.export_ema)",
    )
    ex.add_argument(
        "--trust",
        action="store_true",
        help="load a checkpoint the safe loader refuses (runs "
        "any code it names: only for files from people you trust)",
    )
    args = p.parse_args(argv)
    weights = None if args.weights is None else args.weights == "ema"
    out = export(args.source, args.out, weights, safeload.Trust("--trust", args.trust))
    print(f"exported {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
