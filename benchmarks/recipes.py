"""Training recipes on little data: what each regulariser does to val top-1, and what a step of
it costs.

    python -m benchmarks.recipes [--quick] [--repeats 5] [--out benchmarks/results]

Data: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) as 32 px PNGs
(`python -m distnn.data.digits`: 1,438 train, 359 val), then train/ cut to 20% of each class's
images (a seeded sample, 289 images); val/ whole. `data.source=imagefolder`, no flips (a
mirrored digit is another digit, or none).

Plain: warm-up and cosine, the pad-4 random crop of small images and nothing else; per model
(MODELS) the image size, batch, optimizer, LR and epochs, chosen so that plain lands well short
of the digits' ceiling in a short run: tutorial_cnn at 32 px with SGD, resnet18 at 16 px with
AdamW (the digits are 8x8 scans; 32 px costs 4x, and the pad-4 crop moves a 16 px digit twice
as far for its size: a harder plain). Each piece alone on top of plain (PIECES): RandAugment
(2 ops, magnitude 9), random erasing (p 0.25), MixUp (α 0.2), CutMix (α 1.0), label smoothing
(0.1), and an EMA of the weights (timm's decay warm-up 1 - (1 + n)^(-2/3), capped at 0.99:
these runs are short enough that the warm-up sets the decay, 0.93 by step 54, 0.95 by step
90). The full recipe is all of them at once (MixUp or CutMix per batch, even odds, label
smoothing folded into the mixed targets).

Accuracy: `distnn.train.train(cfg)` in this process, one run per model × config × seed (seeds 0
.. repeats-1), data.workers=0, one thread (torch.set_num_threads(1): on the shared 2-core
machine a second thread made these small steps several times slower, and the runs are serial
anyway), no TensorBoard, W&B disabled, one evaluation at the end. A seed fixes the initial
weights and the sample order, so each piece is compared with plain seed by seed (paired
differences). An EMA changes nothing of the training it averages, so the EMA row is read off the
plain runs (`val_top1_ema` beside their `val_top1`); that plain's top-1 is the same with the EMA
off is checked on seed 0 of the first model. The full recipe's row gives the model's top-1, and
a second row its EMA's.

Cost per step: per model, an Engine for plain and one per piece (and the full recipe), built
as `train()` builds them, each timed over the same number of optimizer steps on the same
batches (loader, decode, augmentation, mixing, forward, backward, step, EMA update: with
data.workers=0 the data side runs in the loop, where workers would take it off it). After a
warm-up pass of each, passes alternate with plain in ABBA order; seconds per step and the
ratio piece ÷ plain per pair (median, min, max). Evaluation is not timed (an EMA doubles it).

Writes results/recipes.json and .md.
"""

from __future__ import annotations

import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import describe, machine, parser, save, summarize
from benchmarks.train_throughput import abba
from distnn import checkpoint, config, mixing, models, monitor, optim, parallel, preempt
from distnn import data as data_lib
from distnn import precision as precision_lib
from distnn.data import digits
from distnn.ema import Averaging
from distnn.engine import Engine, Position
from distnn.parallel import dist
from distnn.train import num_classes, seed_everything, train

FRACTION, SUBSET_SEED = 0.2, 0
EMA = ["train.ema_decay=0.99", "train.ema_warmup=true"]
# Each piece alone on top of plain; the full recipe is all of them.
PIECES: dict[str, list[str]] = {
    "randaugment": ["data.augment=randaugment", "data.augment_ops=2", "data.augment_magnitude=9"],
    "random_erasing": ["data.random_erasing=0.25"],
    "mixup": ["train.mixup_alpha=0.2"],
    "cutmix": ["train.cutmix_alpha=1.0"],
    "label_smoothing": ["train.label_smoothing=0.1"],
    "ema": EMA,
}
FULL = [o for overrides in PIECES.values() for o in overrides]
# Per model: image size, batch, optimizer, peak LR, weight decay, warm-up steps, epochs, steps
# per timed pass (at most an epoch's).
MODELS: dict[str, dict] = {
    "tutorial_cnn": {"image_size": 32, "batch": 32, "optimizer": "sgd", "lr": 0.03,
                     "weight_decay": 5e-4, "warmup_steps": 9, "epochs": 10, "cost_steps": 9},
    # 16 px: the digits are 8x8 scans, and 32 px costs 4x (2-4 s a step on the loaded 2-core
    # machine: over an hour for the runs). SGD (LR 0.01-0.05) reached 0.1-0.5 in 36-72 steps;
    # AdamW ~0.7 in 54.
    "resnet18": {"image_size": 16, "batch": 16, "optimizer": "adamw", "lr": 0.001,
                 "weight_decay": 0.05, "warmup_steps": 9, "epochs": 3, "cost_steps": 2},
}  # fmt: skip
QUICK = {"tutorial_cnn": {**MODELS["tutorial_cnn"], "epochs": 1, "cost_steps": 2}}
THREADS = 1


def make_data(root: Path) -> dict:
    """The digits as 32 px PNGs in root/digits, and root/subset: FRACTION of each class's
    training images (seeded), the whole val split."""
    full, subset = root / "digits", root / "subset"
    digits.write(full)
    rng = random.Random(SUBSET_SEED)
    per_class = {}
    for cls in sorted(p for p in (full / "train").iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.png"))
        keep = sorted(rng.sample(files, max(1, round(len(files) * FRACTION))))
        (subset / "train" / cls.name).mkdir(parents=True)
        for f in keep:
            shutil.copy(f, subset / "train" / cls.name / f.name)
        per_class[cls.name] = len(keep)
    shutil.copytree(full / "val", subset / "val")
    return {
        "root": subset,
        "train_images": sum(per_class.values()),
        "train_per_class": per_class,
        "train_images_whole": sum(1 for _ in (full / "train").rglob("*.png")),
        "val_images": sum(1 for _ in (subset / "val").rglob("*.png")),
        "fraction": FRACTION,
        "subset_seed": SUBSET_SEED,
    }


def base_overrides(model: str, spec: dict, root: Path, runs: Path, name: str) -> list[str]:
    return [
        "data.source=imagefolder", f"data.root={root}", "data.hflip=false",
        f"data.image_size={spec['image_size']}", "data.workers=0", f"model.name={model}",
        f"optim.name={spec['optimizer']}", f"optim.lr={spec['lr']}",
        f"optim.weight_decay={spec['weight_decay']}", "sched.name=cosine",
        *(["optim.momentum=0.9", "optim.nesterov=true"] if spec["optimizer"] == "sgd" else []),
        f"sched.warmup_steps={spec['warmup_steps']}", f"train.batch_size={spec['batch']}",
        f"train.epochs={spec['epochs']}", f"train.eval_every={spec['epochs']}",
        "train.log_every=1000", f"run.dir={runs}", f"run.name={name}", "log.progress=off",
        "log.wandb.mode=disabled", "log.tensorboard=false", "ckpt.resume=never",
        "ckpt.epoch_end=false",
    ]  # fmt: skip


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value), min, max, every value."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values),
            "max": max(values), "runs": values}  # fmt: skip


def train_once(overrides: list[str], runs: Path, name: str) -> dict:
    start = time.perf_counter()
    summary = train(config.load(None, overrides))
    wall = time.perf_counter() - start
    shutil.rmtree(runs / name, ignore_errors=True)  # its checkpoints: ~45 MB for resnet18
    keys = ("val_top1", "val_top1_ema", "train_loss")
    return {"wall_s": wall, **{k: summary[k] for k in keys if k in summary}}


def accuracy(model: str, spec: dict, seeds: int, root: Path, runs: Path, check: bool) -> dict:
    """Every config's runs of `model`, seed by seed; with `check`, seed 0's plain run once
    more without the EMA (its top-1 must not move)."""
    configs = {"plain": EMA, **{k: v for k, v in PIECES.items() if k != "ema"}, "full": FULL}
    got: dict[str, list[dict]] = {name: [] for name in configs}
    checked = None
    for seed in range(seeds):
        for name, extra in configs.items():
            run_name = f"{model}-{name}-{seed}"
            overrides = [*base_overrides(model, spec, root, runs, run_name),
                         f"train.seed={seed}", *extra]  # fmt: skip
            r = train_once(overrides, runs, run_name)
            got[name].append(r)
            print(f"{model:12} {name:15} seed {seed}: val_top1 {r['val_top1']:.4f}"
                  + (f", ema {r['val_top1_ema']:.4f}" if "val_top1_ema" in r else "")
                  + f" ({r['wall_s']:.1f} s)", flush=True)  # fmt: skip
        if check and seed == 0:
            run_name = f"{model}-plain-no-ema-0"
            overrides = [*base_overrides(model, spec, root, runs, run_name), "train.seed=0"]
            alone = train_once(overrides, runs, run_name)["val_top1"]
            checked = {"seed": 0, "plain_val_top1_ema_off": alone,
                       "plain_val_top1_ema_on": got["plain"][0]["val_top1"],
                       "equal": alone == got["plain"][0]["val_top1"]}  # fmt: skip
            if not checked["equal"]:
                raise RuntimeError(f"{model}: the EMA changed plain's top-1: {checked}")
    rows = []
    plain = [r["val_top1"] for r in got["plain"]]

    def row(config_name: str, runs_of: str, metric: str, overrides: list[str]) -> None:
        values = [r[metric] for r in got[runs_of]]
        rows.append({
            "model": model, "config": config_name, "overrides": overrides,
            "runs_of": runs_of, "metric": metric, "seeds": list(range(seeds)),
            "top1": spread(values),
            "vs_plain": spread([v - p for v, p in zip(values, plain, strict=True)]),
            "wall_s": summarize([r["wall_s"] for r in got[runs_of]]),
        })  # fmt: skip

    row("plain", "plain", "val_top1", [])
    for name, extra in PIECES.items():
        if name == "ema":
            row("ema", "plain", "val_top1_ema", extra)
        else:
            row(name, name, "val_top1", extra)
    row("full", "full", "val_top1", FULL)
    row("full (EMA)", "full", "val_top1_ema", FULL)
    return {"rows": rows, "ema_check": checked}


def build_engine(overrides: list[str]) -> Engine:
    """An Engine as `train()` builds it (single process), for `train.max_steps` steps."""
    cfg = config.load(None, overrides)
    env = parallel.detect()
    cfg = config.for_world(cfg, env.world_size, env.local_world_size)
    device = dist.device_for(env)
    precision = precision_lib.build(cfg.precision, device)
    loaders = data_lib.build(cfg, env)
    strategy = parallel.build(cfg, env, device, precision)
    seed_everything(cfg.train.seed)
    model, head, _ = models.prepare(cfg, num_classes(cfg, loaders.classes), device,
                                    meta_init=strategy.meta_init)  # fmt: skip
    optimizers = optim.Optimizers(cfg.optim, config.global_batch(cfg, env.world_size), head)
    schedule = optim.Schedule(cfg.sched, cfg.train.max_steps)
    mixer = mixing.build_mixer(cfg.train, len(loaders.classes), env.rank)
    forward = strategy.setup(model, optimizers, schedule, Averaging(cfg.train))
    run = monitor.Run(cfg, env, cfg.train.max_steps)
    ckpt = checkpoint.Manager(cfg.ckpt, cfg.run_dir, writes=False)
    return Engine(cfg, strategy, forward, loaders, precision, device, run, ckpt,
                  preempt.Watcher(cfg.dist.timeout_s), loss=mixing.build_loss(cfg.train),
                  mixer=mixer)  # fmt: skip


def seconds_per_step(engine: Engine) -> float:
    """One timed pass: the first `train.max_steps` batches of epoch 0, from step 0."""
    engine.pos = Position()
    start = time.perf_counter()
    engine.train_epoch()
    elapsed = time.perf_counter() - start
    steps = engine.cfg.train.max_steps
    assert engine.pos.step == steps, (engine.pos.step, steps)
    return elapsed / steps


def cost(model: str, spec: dict, repeats: int, root: Path, runs: Path) -> list[dict]:
    """Seconds per step of each piece (and the full recipe) against plain, ABBA."""
    steps = spec["cost_steps"]

    def engine(name: str, extra: list[str]) -> Engine:
        overrides = [*base_overrides(model, spec, root, runs, f"cost-{model}-{name}"),
                     "train.seed=0", f"train.max_steps={steps}", "sched.name=constant",
                     "ckpt.keep=1", *extra]  # fmt: skip
        return build_engine(overrides)

    plain = engine("plain", [])
    seconds_per_step(plain)  # warm-up
    rows = []
    for name, extra in [*PIECES.items(), ("full", FULL)]:
        piece = engine(name, extra)
        seconds_per_step(piece)  # warm-up
        times: dict[str, list[float]] = {"plain": [], "piece": []}
        for i in range(repeats):
            for side, eng in abba([("plain", plain), ("piece", piece)], i):
                times[side].append(seconds_per_step(eng))
        # Both sides passed the same batches of the same size the same number of times.
        images = steps * spec["batch"]
        ratios = [p / b for p, b in zip(times["piece"], times["plain"], strict=True)]
        rows.append({
            "model": model, "config": name, "overrides": extra, "steps": steps,
            "batch": spec["batch"], "images_per_pass": images, "order": "ABBA",
            "same_work_checked": "steps and batches per pass",
            "plain_s_per_step": summarize(times["plain"]),
            "piece_s_per_step": summarize(times["piece"]), "ratio": summarize(ratios),
        })  # fmt: skip
        r = rows[-1]["ratio"]
        print(f"{model:12} {name:15} cost × plain {r['median']:.3f} ({r['min']:.3f} – "
              f"{r['max']:.3f}), {statistics.median(times['piece']) * 1e3:.0f} ms/step",
              flush=True)  # fmt: skip
        piece.run.close()
        del piece
        gc.collect()
    plain.run.close()
    return rows


def run(quick: bool, repeats: int, out: Path) -> dict:
    specs = QUICK if quick else MODELS
    seeds = {m: 1 if quick else repeats for m in specs}
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats, "seeds": seeds,
                     "threads": THREADS, "models": specs, "pieces": PIECES, "full": FULL,
                     "rows": [], "cost": []}  # fmt: skip
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            info = make_data(Path(tmp))
            root = info.pop("root")
            results["data"] = info
            runs = Path(tmp) / "runs"
            for i, (model, spec) in enumerate(specs.items()):
                got = accuracy(model, spec, seeds[model], root, runs, check=i == 0)
                results["rows"] += got["rows"]
                if got["ema_check"] is not None:
                    results["ema_check"] = got["ema_check"]
                results["cost"] += cost(model, spec, repeats, root, runs)
    finally:
        torch.set_num_threads(threads)
    results["wall_s"] = time.perf_counter() - start
    return save(out, "recipes", results, markdown)


def _pct(stats: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.1f} ± {100 * stats['std']:.1f}"


def markdown(results: dict) -> str:
    quick = " (quick run)" if results["quick"] else ""
    d, seeds = results["data"], results["seeds"]
    specs = "; ".join(
        f"{m}: {s['image_size']} px, batch {s['batch']}, {s['optimizer']} lr {s['lr']} "
        f"weight decay {s['weight_decay']}, {s['epochs']} epochs, {seeds[m]} seed(s)"
        for m, s in results["models"].items()
    )
    lines = [
        "# Training recipes on 20% of the digits",
        "",
        f"{describe(results['machine'])}{quick} {results['threads']} thread; "
        f"{results['wall_s'] / 60:.1f} min in all.",
        "",
        f"{d['train_images']} training images ({d['fraction']:.0%} of {d['train_images_whole']}, "
        f"each class sampled with seed {d['subset_seed']}), {d['val_images']} val. {specs}. "
        "Warm-up + cosine, pad-4 crop, no flips. Val top-1 in %: mean ± standard deviation "
        "over seeds, and the difference to plain at the same seed (same initial weights and "
        "sample order) as mean ± std [min, max]. EMA rows: the EMA's top-1 (`ema`: of the "
        "plain runs). Cost: seconds per optimizer step (data loading and augmentation in the "
        f"loop, data.workers=0) ÷ plain's, median of {results['repeats']} ABBA pairs "
        "(min – max); ms/step: the medians of plain's passes and the piece's in those pairs "
        "(plain's row: all its passes). Others' load moved the absolute times between blocks "
        "of pairs: compare within a row.",
        "",
        "| model | config | val top-1 % | vs plain (points) | cost × plain | ms/step |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    costs = {(c["model"], c["config"]): c for c in results["cost"]}
    for r in results["rows"]:
        v, model, name = r["vs_plain"], r["model"], r["config"]
        delta = ratio = ms = ""
        if name != "plain":
            delta = f"{_pct(v, True)} [{100 * v['min']:+.1f}, {100 * v['max']:+.1f}]"
        c = costs.get((model, name))
        if name == "plain":  # plain's passes of every pair of this model
            passes = [t for c in results["cost"] if c["model"] == model
                      for t in c["plain_s_per_step"]["runs"]]  # fmt: skip
            ratio, ms = "1", f"{1e3 * statistics.median(passes):.0f}" if passes else ""
        elif c is not None:
            q = c["ratio"]
            ratio = f"{q['median']:.2f} ({q['min']:.2f} – {q['max']:.2f})"
            base, piece = c["plain_s_per_step"]["median"], c["piece_s_per_step"]["median"]
            ms = f"{1e3 * base:.0f} → {1e3 * piece:.0f}"
        lines.append(f"| {model} | {name} | {_pct(r['top1'])} | {delta} | {ratio} | {ms} |")
    check = results.get("ema_check")
    if check:
        lines += ["", f"The EMA left training alone: plain's seed-0 top-1 with the EMA on, "
                  f"{check['plain_val_top1_ema_on']:.4f}, equals it with the EMA off."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser(
        "benchmarks.recipes",
        __doc__,
        "tutorial_cnn only, 1 seed, 2 epochs, 3 steps per timed pass",
        "seeds, and ABBA pairs per cost figure (>= 5)",
    )
    args = p.parse_args(argv)
    print(markdown(run(args.quick, args.repeats, args.out)))


if __name__ == "__main__":
    main(sys.argv[1:])
