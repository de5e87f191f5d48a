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
import dataclasses
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as td

from distnn import checkpoint_remote, fsio, safeload, storage
from distnn.checkpoint_files import NAME, STATE, export, load_file, step_of
from distnn.config import CkptConfig
from distnn.errors import UserError, cli, reason
from distnn.parallel.dist import all_true, barrier, gather_objects


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


class RankRNG:
    """Every rank's random generators as one stateful piece of a checkpoint: saved in rank
    order (a collective: dropout masks differ per rank), each rank restoring its own; a rank
    beyond those saved (a larger world) keeps its seeding."""

    def state_dict(self) -> list[dict[str, Any]]:
        return gather_objects(rng_state())

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
        self.elsewhere = dataclasses.replace(self.trust, own=None)  # what the bucket gave
        self.writes = writes
        self.last_saved_step = -1
        self.best_value: float | None = None
        self.restored_from: Path | None = None
        # ckpt.remote: rank 0's uploader (from discard_lost on), and what resume downloaded.
        self.remote = (
            storage.Remote(cfg.remote, cfg.storage_options, cfg.retry_s, "ckpt.retry_s")
            if cfg.remote
            else None
        )
        self.mirror: checkpoint_remote.Mirror | None = None

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
        for old in [*self.saved()[: -self.cfg.keep], checkpoint_remote.marker(path)]:
            fsio.remove(old)  # a marker: the step is this run's own now
        if self.mirror is not None:
            self.mirror.submit(path, best)
        return path

    def finish(self, device: torch.device, limit_s: float | None = None) -> None:
        """Every rank: back once the bucket holds this run's checkpoints (or their uploads gave
        up), or after `limit_s` (a preemption's notice is short: the requeue must not miss it).
        The ranks wait together, agreeing every 2 s: no collective waits longer than that
        however long an upload takes, and no rank exits (which makes torchrun stop the others)
        before rank 0's upload is done."""
        if self.remote is None:
            return
        url = storage.shown(self.remote.root)
        deadline = None if limit_s is None else time.monotonic() + limit_s
        said = False
        while True:
            done = self.mirror is None or self.mirror.wait(timeout=2.0)
            late = deadline is not None and time.monotonic() > deadline
            if self.mirror is not None and not (done or said):
                print(f"waiting for {', '.join(self.mirror.pending())} to reach {url}", flush=True)
                said = True
            if all_true(done or late, device):
                break
        if self.mirror is not None and not done:
            pending = ", ".join(self.mirror.pending())
            print(f"warning: stopped waiting after {limit_s:g} s (ckpt.upload_wait_s): "
                  f"{pending} may not reach {url}", flush=True)  # fmt: skip
        elif self.mirror is not None and self.mirror.failed:
            print(f"warning: {self.mirror.failed}: {url} holds an older one", flush=True)

    def close(self) -> None:
        """The uploader stops, after its uploads: on every exit path (on an error, rank 0
        alone waits for them)."""
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None

    @property
    def origin(self) -> str:
        """Where the restored checkpoint came from, as a log line names it."""
        path = self.restored_from
        if path is not None and checkpoint_remote.marker(path).exists():
            return f"{checkpoint_remote.marker(path).read_text().strip()} (downloaded to {path})"
        return str(path)

    def _save_directory(
        self, state: dict[str, Any], path: Path, save_shards: Callable[[Path], None]
    ) -> None:
        # Rank 0's fresh name, where every rank writes.
        tmp = gather_objects(fsio.temp_path(path))[0]

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
        error = next((e for e in gather_objects(error) if e is not None), None)
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
        if not self.writes:
            return
        step = state["position"]["step"] if state else 0
        self._forget_after(step)
        # What writers killed mid-write left (the run holds its directory's lock).
        for partial in [*self.dir.glob(".*.tmp"), *self.dir.parent.glob(".*.tmp")]:
            fsio.remove(partial)
        if self.remote is not None:
            index = checkpoint_remote.read_index(self.remote)
            if checkpoint_remote.forget(index, step):  # the index first; the uploader deletes
                checkpoint_remote.write_index(self.remote, index)
            self.mirror = checkpoint_remote.Mirror(self.remote, self.dir, self.cfg.keep, index)
            restored = self.restored_from
            uploaded = restored is None or restored.name in index["complete"]
            if not uploaded and restored.parent == self.dir:  # its upload was cut short
                self.mirror.submit(restored, best=False)

    def _load(self) -> dict[str, Any] | None:
        candidates = [Path(self.cfg.resume)] if self.cfg.resume != "auto" else []
        for path in candidates or self._newest_first():
            # What came from the bucket is not the run's own files: the safe loader's rules.
            fetched = checkpoint_remote.marker(path).exists()
            try:
                state = load_file(path, self.elsewhere if fetched else self.trust)
            except UserError as e:
                # One from the bucket is not skipped: the run would start over, or continue
                # from an older local one, and then replace the bucket's newer checkpoints.
                if candidates or fetched:
                    raise
                warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
                continue
            self.restored_from = path
            self.best_value = state.get("best_value")
            self.last_saved_step = state["position"]["step"]  # saving it again changes nothing
            return state
        return None

    def _newest_first(self) -> Iterator[Path]:
        """This run's checkpoints, newest first; with ckpt.remote, the bucket's newest complete
        one among them, downloaded when its turn comes (a requeued job on a node whose disk is
        empty or behind, or whose newer local ones do not load). A download that fails stops
        the run in one line: going on without it would replace the bucket's checkpoints."""
        local = list(reversed(self.saved()))
        if self.remote is None:
            yield from local
            return
        index = checkpoint_remote.read_index(self.remote)
        cut = index["uploading"]
        if cut is not None and self.writes and cut["name"] not in {p.name for p in local}:
            warnings.warn(
                f"skipping checkpoint {storage.shown(self.remote.url(cut['name']))}: its upload "
                "was cut short (the job ended during it)",
                stacklevel=2,
            )
        name = checkpoint_remote.newest(index)
        ahead = -1 if name is None else index["complete"][name]["step"]
        for path in local:
            if step_of(path.name) < ahead:
                yield checkpoint_remote.download(self.remote, index, name, self.dir)
                ahead = -1
            yield path
        if ahead >= 0:
            yield checkpoint_remote.download(self.remote, index, name, self.dir)

    def _forget_after(self, step: int) -> None:
        stale = [p for p in self.saved() if step_of(p.name) > step]
        if step == 0:
            stale += [self.dir / name for name in ("best.pt", "best", "latest")]
        for p in stale:
            fsio.remove(p)


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distnn.checkpoint")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "export", help="write the weights as safetensors, or the model as ONNX (+ .json)"
    )
    ex.add_argument("source", help="run directory or checkpoint file")
    ex.add_argument("out", help="output .safetensors or .onnx path (the .json goes beside it)")
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
    trust = safeload.Trust("--trust", args.trust)
    out = Path(args.out)
    if out.suffix == ".onnx":
        from distnn import export_onnx  # imports torch.onnx: only for this command

        meta = export_onnx.export(args.source, out, weights, trust)
        print(f"exported {out} and {out.with_suffix('.json')} (onnxruntime's logits within "
              f"{meta['max_abs_diff']:.2g} of torch's)")  # fmt: skip
        return
    out = export(args.source, out, weights, trust)
    print(f"exported {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
