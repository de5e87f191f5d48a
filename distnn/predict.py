"""Classify images, or whole datasets, with a trained checkpoint, on any number of ranks.

    python -m distnn.predict --checkpoint runs/NAME IMG|DIR [...] [--topk 3]
    torchrun --nproc_per_node=N -m distnn.predict --checkpoint RUN --output preds.parquet \\
        data.source=shards data.root=s3://bucket/shards [--split val]

`--checkpoint` takes a run directory (its latest checkpoint), a checkpoint file, or an export
(python -m distnn.checkpoint export: model.safetensors with its model.json). The file is data:
it is read by the safe loader, and the model it names is built only from the zoo, tv: and
timm:; a model of your own is named again with --model pkg.module:callable.

The inputs are image files and directories (recursively), or training's own `data.*` keys
naming any source training reads (none: the checkpoint's own data, its val split). Every sample
is predicted once, whatever the number of ranks; with --output the rows go to a CSV, JSONL or
Parquet file (distnn/predictions.py), written in parts a killed job's rerun skips; without it
they are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import rich.console
import rich.progress
import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from distnn import checkpoint_files, faults, inference, models, parallel, safeload
from distnn.data import order
from distnn.data.errors import DataErrors, Unreadable
from distnn.errors import UserError, cli
from distnn.inference import Predictor
from distnn.parallel import dist
from distnn.predictions import Parts, Row, columns, failed, fingerprint, format_of, rows


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
    p.add_argument("--output", help="a .csv, .jsonl or .parquet file (a path or s3://, https://)")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward, per rank")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help="NHWC (faster convs on CUDA)")
    p.add_argument("--tta", default="none", choices=tuple(inference.TTA),
                   help="average probabilities over views: hflip costs 2 forwards a batch, "
                   "five-crop 5")  # fmt: skip
    p.add_argument("--save-probs", action="store_true", help="every class's probability too")
    p.add_argument("--split", default="val", help="of a source named by data.* keys")
    p.add_argument("--part-size", type=int, default=0,
                   help="samples per part of --output (default: about 1/1024 of the samples, up "
                   "to 4096; below 1024 batches a batch, at most 1/64 of them)")  # fmt: skip
    p.add_argument("--device", help="single process: where to run (default: cuda if present)")
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
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, directories, or data.KEY=VALUE")  # fmt: skip
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("topk", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.part_size < 0:
        raise UserError(f"--part-size must be >= 1 (0: automatic), got {args.part_size}")
    if args.output:
        format_of(args.output)


@cli
def main(argv: list[str] | None = None) -> list[Row]:
    """Rank 0's rows in the dataset's order (all of them without --output)."""
    args = parser().parse_args(argv)
    _check(args)
    state = checkpoint_files.load_any(args.checkpoint, safeload.Trust("--trust", args.trust))
    env = parallel.detect()
    inputs = inference.open_inputs(args.inputs, state, env, args.split)  # before the group
    with dist.process_group(env, inputs.cfg.dist) as device:
        if args.device is not None:
            device = torch.device(args.device)
        predictor = Predictor(state, device, named_model(args.model, state), args.precision,
                              args.channels_last, args.tta)  # fmt: skip
        return Job(args, predictor, inputs, env).run()


class Progress:
    """Rank 0's progress through its own samples: a bar with samples/s and ETA on a terminal,
    else a line every 30 s (Slurm logs)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = self.shown = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = rich.progress.Progress(
                TextColumn("[bold]predict (rank 0)"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("eta"), TimeRemainingColumn(),
                console=rich.console.Console(stderr=True), transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("predict", total=total, rate="")
            self.bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.0f} samples/s")
        elif self.enabled and now - self.shown >= 30:
            self.shown = now
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"predict: rank 0 {self.done:,}/{self.total:,} samples, {rate:,.0f} "
                  f"samples/s, eta {eta:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class Job:
    """One prediction over `inputs`: this rank's parts, then (rank 0) the merged file."""

    def __init__(self, args: argparse.Namespace, predictor: inference.Predictor,
                 inputs: inference.Inputs, env: parallel.Env) -> None:  # fmt: skip
        self.args, self.predictor, self.inputs, self.env = args, predictor, inputs, env
        self.split = inputs.split
        self.n = len(self.split)
        self.size = args.part_size or order.part_size(self.n, args.batch_size)
        self.count = -(-self.n // self.size)
        self.keys = [self.split.key(i) for i in range(self.n)]
        self.classes = predictor.classes
        self.names = columns(min(args.topk, len(self.classes)), args.save_probs)
        self.parts = Parts(args.output) if args.output else None

    def run(self) -> list[Row]:
        done = self._resume() if self.parts else frozenset()
        errors = DataErrors(listed=[])
        pin = self.predictor.device.type == "cuda"
        loader, mine = inference.loader(self.inputs, self.args.batch_size, self.size, self.env,
                                        errors, done, pin)  # fmt: skip
        fault = faults.from_env()
        pending: dict[int, list[Row]] = {}
        kept: list[Row] = []
        start, seen = time.perf_counter(), 0
        progress = Progress(sum(mine.sizes()), self.env.is_main)
        for b, (logp, y, index) in enumerate(self.predictor.batches(loader), 1):
            idx = index.tolist()
            table = rows(logp, y.tolist(), [self.keys[i] for i in idx], idx, self.classes,
                         self.args.topk, self.args.save_probs)  # fmt: skip
            self._add(pending, table + self._unreadable(errors))
            kept += self._flush(pending, below=idx[0] // self.size)
            seen += len(idx)
            progress.advance(len(idx))
            if fault is not None:  # kill@step:N,rank:R: after the rank's N-th batch
                fault.check(b, self.env.rank)
        self._add(pending, self._unreadable(errors))
        kept += self._flush(pending, below=self.count)
        progress.close()
        elapsed = time.perf_counter() - start
        return self._finish(kept, seen, elapsed, len(mine.mine))

    def _add(self, pending: dict[int, list[Row]], table: list[Row]) -> None:
        """Rows into their parts' lists, until each part is complete."""
        for row in table:
            pending.setdefault(row["index"] // self.size, []).append(row)

    def _resume(self) -> frozenset[int]:
        """The parts already written by an earlier run with the same arguments."""
        a, p = self.args, self.predictor
        plan = {"checkpoint": str(Path(a.checkpoint).resolve()), "split": a.split,
                "samples": self.n, "keys": fingerprint(self.keys), "part_size": self.size,
                "topk": a.topk, "save_probs": a.save_probs, "tta": a.tta,
                "precision": p.precision.name, "inputs": a.inputs}  # fmt: skip
        self.parts.check_plan(plan, write=False)  # every rank: the same line on each
        dist.barrier()
        if self.env.is_main:
            self.parts.check_plan(plan, write=True)
        done = self.parts.done(self.count)
        dist.barrier()  # every rank listed before any writes a part
        if self.env.is_main:
            every = order.Parts(self.n, a.batch_size, self.size, 1, 0, done)
            left = sum(every.sizes())
            print(f"predict: {len(done)} of {self.count} parts already in {a.output}.parts; "
                  f"predicting {self.count - len(done)} parts ({left} samples) on "
                  f"{self.env.world_size} rank(s)", file=sys.stderr, flush=True)  # fmt: skip
        return done

    def _unreadable(self, errors: DataErrors) -> list[Row]:
        """Rows for the samples the reader left out since the last call (data.on_error=skip)."""
        problems, errors.listed[:] = list(errors.listed), []
        return [failed(p.index, self.keys[p.index], -1, p.reason, self.classes)
                for p in problems if isinstance(p, Unreadable)]  # fmt: skip

    def _flush(self, pending: dict[int, list[Row]], below: int) -> list[Row]:
        """Write the parts before `below` (this rank's order is by part: they are complete);
        without --output, keep their rows."""
        kept = []
        for p in sorted(q for q in pending if q < below):
            table = sorted(pending.pop(p), key=lambda r: r["index"])
            if self.parts is None:
                kept += table
            else:
                self.parts.write(p, table)
        return kept

    def _finish(self, kept: list[Row], seen: int, elapsed: float, parts: int) -> list[Row]:
        if self.env.is_main:
            rate = seen / elapsed if elapsed > 0 else 0.0
            print(f"predict: rank 0 scored {seen} samples of {parts} parts in {elapsed:.1f} s "
                  f"({rate:,.0f} samples/s)", file=sys.stderr, flush=True)  # fmt: skip
        if self.parts is None:
            every = sorted((r for rs in dist.gather_objects(kept) for r in rs),
                           key=lambda r: r["index"])  # fmt: skip
            if self.env.is_main:
                for row in every:
                    self._print(row)
            return every
        dist.barrier()  # every part written
        if not self.env.is_main:
            return []
        written = self.parts.merge(self.count, self.names)
        print(f"predict: wrote {written} rows to {self.args.output}", file=sys.stderr, flush=True)
        return []

    def _print(self, row: Row) -> None:
        if row["error"] is not None:
            print(f"{row['key']}: unreadable: {row['error']}")
            return
        k = sum(name.startswith("class_") for name in row)
        ranked = ", ".join(f"{row[f'class_{j}']} {row[f'prob_{j}']:.3f}" for j in range(1, k + 1))
        truth = f"  (true: {row['label']})" if row["label"] is not None else ""
        print(f"{row['key']}: {ranked}{truth}")


if __name__ == "__main__":
    main(sys.argv[1:])
