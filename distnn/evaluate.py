"""Evaluate a checkpoint on a labelled source, on any number of ranks.

    python -m distnn.evaluate --checkpoint RUN_OR_FILE [--output DIR] [key=value ...]
    torchrun --nproc_per_node=N -m distnn.evaluate --checkpoint RUN data.source=imagefolder \\
        data.root=/data/imagenet

The data is named with training's own dotted keys (default: the checkpoint's own data, its val
split). Every sample is scored once (the parts of distnn.predict); each rank adds up its
confusion matrix, loss, top-5 hits and calibration bins, one all-reduce sums them, and rank 0
writes report.json (top-1/top-5, loss, per-class precision/recall/F1, expected calibration
error) with confusion.png, reliability.png and hardest.png (the samples given the lowest
probability of their true class) to DIR (default: RUN/evaluate, or FILE.evaluate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from distnn import checkpoint_files, config, fsio, inference, parallel, report, safeload
from distnn.config import Config
from distnn.data import order
from distnn.data.errors import DataErrors
from distnn.data.sources import decode_rgb
from distnn.data.transforms import EvalTransform
from distnn.errors import UserError, cli
from distnn.monitor.wandb import WandbSink
from distnn.parallel import dist
from distnn.predict import named_model

BINS = 15  # calibration bins of confidence (as Guo et al. 2017)
HARDEST = 16
SCALARS = ("top1", "top5", "loss", "ece", "macro_f1")
FIGURES = ("confusion", "reliability", "hardest")


class Tally:
    """One rank's sums over its samples: what one all-reduce makes the job's."""

    def __init__(self, classes: int) -> None:
        self.k = classes
        self.confusion = torch.zeros(classes * classes, dtype=torch.float64)  # true × predicted
        self.sums = torch.zeros(2, dtype=torch.float64)  # loss, top-5 hits
        self.bins = torch.zeros(3, BINS, dtype=torch.float64)  # count, confidence, correct
        self.hardest: list[tuple[float, int, int, int]] = []  # (p_true, index, true, predicted)

    def add(self, logp: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        logp, y = logp.cpu(), y.cpu()
        pred = logp.argmax(dim=1)
        true_logp = logp.gather(1, y[:, None])[:, 0]
        top5 = logp.topk(min(5, self.k), dim=1).indices
        self.confusion += torch.bincount(y * self.k + pred, minlength=self.k * self.k)
        self.sums += torch.stack([-true_logp.double().sum(), (top5 == y[:, None]).sum().double()])
        conf = logp.max(dim=1).values.exp().double()
        b = (conf * BINS).long().clamp(max=BINS - 1)
        for row, weights in enumerate((None, conf, (pred == y).double())):
            self.bins[row] += torch.bincount(b, weights=weights, minlength=BINS).double()
        p_true = true_logp.exp().tolist()
        self.hardest = sorted(
            self.hardest + list(zip(p_true, index.tolist(), y.tolist(), pred.tolist(), strict=True))
        )[:HARDEST]

    def reduce(self, device: torch.device) -> None:
        """The job's sums on every rank (over `device`: NCCL reduces GPU tensors only)."""
        flat = torch.cat([self.confusion, self.sums, self.bins.flatten()]).to(device)
        flat = dist.all_reduce_sum(flat).cpu()
        n = self.k * self.k
        self.confusion, self.sums = flat[:n], flat[n : n + 2]
        self.bins = flat[n + 2 :].view(3, BINS)
        self.hardest = sorted(h for hs in dist.gather_objects(self.hardest) for h in hs)[:HARDEST]


def metrics(tally: Tally, classes: list[str]) -> dict[str, Any]:
    cm = tally.confusion.view(tally.k, tally.k).numpy()
    n = cm.sum()
    if n == 0:
        raise UserError("no sample could be read: nothing to evaluate")
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    count, conf, correct = tally.bins.numpy()
    ece = float(np.abs(conf - correct).sum() / n)  # Σ_b |B_b|/n · |conf_b − acc_b|
    return {
        "samples": int(n),
        "top1": float(tp.sum() / n),
        "top5": float(tally.sums[1] / n),
        "loss": float(tally.sums[0] / n),
        "ece": ece,
        "macro_f1": float(f1.mean()),
        "per_class": [
            {
                "class": c,
                "precision": float(p),
                "recall": float(r),
                "f1": float(f),
                "support": int(s),
            }
            for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        ],
        "calibration": {
            "bins": BINS,
            "count": count.tolist(),
            "confidence": conf.tolist(),
            "correct": correct.tolist(),
        },
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distnn.evaluate",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint file or export")
    p.add_argument("--output", type=Path, help="report directory")
    p.add_argument("--ema", action="store_true", help="the EMA of the weights")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tta", default="none", choices=tuple(inference.TTA))
    p.add_argument("--model", metavar="PKG.MODULE:CALLABLE", help="as distnn.predict --model")
    p.add_argument("--trust", action="store_true", help="as distnn.predict --trust")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data.*, precision, ...")
    return p


def default_output(checkpoint: str) -> Path:
    path = Path(checkpoint)
    return path / "evaluate" if path.is_dir() else path.with_name(path.name + ".evaluate")


@cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The report (rank 0; the others get {})."""
    args = parser().parse_args(argv)
    if bad := [o for o in args.overrides if "=" not in o]:
        raise UserError(f"{bad[0]!r} is not KEY=VALUE: name the data with data.* keys")
    state = checkpoint_files.load_any(args.checkpoint, safeload.Trust("--trust", args.trust))
    env = parallel.detect()
    inputs = inference.open_inputs(args.overrides, state, env, args.split)
    out = args.output or default_output(args.checkpoint)
    with dist.process_group(env, inputs.cfg.dist) as device:
        predictor = inference.Predictor(
            state, device, named_model(args.model, state), inputs.cfg.precision,
            inputs.cfg.model.channels_last, args.tta, args.ema,
        )  # fmt: skip
        tally = Tally(len(predictor.classes))
        errors = DataErrors()
        n = len(inputs.split)
        loader, _ = inference.loader(inputs, args.batch_size,
                                     order.part_size(n, args.batch_size), env, errors)  # fmt: skip
        for logp, y, index in predictor.batches(loader):
            tally.add(logp, y, index)
        tally.reduce(device)
        skipped = int(dist.all_reduce_sum(torch.tensor([float(errors.skipped)], device=device)))
        if not env.is_main:
            return {}
        result = write(out, tally, predictor, inputs, args, skipped)
        if Path(args.checkpoint).is_dir():  # a run: its own trackers get the report too
            run_dir = Path(args.checkpoint)
            cfg = config.load(inputs.cfg, [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}"])
            to_trackers(cfg, state.get("position", {}).get("step", 0), result, out)
        return result


def to_trackers(cfg: Config, step: int, result: dict[str, Any], out: Path) -> None:
    """The report's figures and scalars in the run's TensorBoard (log.tensorboard) at the
    checkpoint's step, and in its W&B run (log.wandb.mode), as `evaluate/...`."""
    scalars = {f"evaluate/{k}": result[k] for k in SCALARS}
    images = {}
    for name in FIGURES:
        with Image.open(out / f"{name}.png") as im:
            images[f"evaluate/{name}"] = np.asarray(im.convert("RGB"))
    if cfg.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with contextlib.closing(SummaryWriter(str(Path(cfg.run_dir) / "tb"))) as writer:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
            for key, image in images.items():
                writer.add_image(key, image, step, dataformats="HWC")
    sink = WandbSink.start(cfg, max(step, 1), lambda line: print(line, file=sys.stderr))
    if sink is not None:  # the run's own W&B run, resumed by its id: after its last step
        import wandb

        sink.run.log(scalars | {k: wandb.Image(v) for k, v in images.items()})
        sink.run.summary.update(scalars)
        sink.close()


def write(out: Path, tally: Tally, predictor: inference.Predictor, inputs: inference.Inputs,
          args: argparse.Namespace, skipped: int) -> dict[str, Any]:  # fmt: skip
    classes = predictor.classes
    result = {"checkpoint": str(args.checkpoint), "weights": "ema" if args.ema else "model",
              "source": inputs.source, "split": args.split, "tta": args.tta,
              "precision": predictor.precision.name, "skipped": skipped,
              **metrics(tally, classes)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    cm = tally.confusion.view(tally.k, tally.k).numpy()
    report.confusion(cm, classes, out / "confusion.png")
    report.reliability(result["calibration"], result["ece"], out / "reliability.png")
    images = [(_image(inputs, predictor, i), classes[t], classes[p], pt)
              for pt, i, t, p in tally.hardest]  # fmt: skip
    report.hardest(images, out / "hardest.png")
    fsio.write_text(out / "report.json", json.dumps(result, indent=1) + "\n")
    print(f"evaluate: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  loss "
          f"{result['loss']:.4f}  ECE {result['ece']:.4f} on {result['samples']} samples "
          f"({skipped} unreadable); report in {out}/ (confusion.png, reliability.png, "
          "hardest.png)", file=sys.stderr, flush=True)  # fmt: skip
    return result


def _image(inputs: inference.Inputs, predictor: inference.Predictor, i: int) -> np.ndarray:
    """Sample i as the model saw it (the eval transform), H × W × 3 uint8."""
    image, _ = inputs.split.sample(i)
    if not isinstance(image, np.ndarray):
        image = decode_rgb(image, inputs.cfg.data.max_pixels)
    return EvalTransform(predictor.size).batch([image])[0].permute(1, 2, 0).numpy()


if __name__ == "__main__":
    main(sys.argv[1:])
