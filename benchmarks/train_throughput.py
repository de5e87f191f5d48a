"""Training throughput: distnn's loop against a bare PyTorch loop, and 1 → 2 process scaling.

    python -m benchmarks.train_throughput [--quick] [--repeats 5] [--out benchmarks/results]
                                          [--fsdp-only]

- distnn vs bare: the same model, batch, optimizer, schedule and in-memory uint8 batches, run
  by distnn's Engine (single strategy, device prefetcher, metering, logging every 10 steps)
  and by a hand-written loop (normalise, forward, loss, backward, step). Both start from the
  same weights and must end on the same weights: the check that they do the same work. Timed
  passes alternate between the two in ABBA order (distnn first in even pairs, the bare loop
  in odd ones, so that neither always runs second); images/s and the ratio distnn / bare per
  pair.
- overhead: the same on one Linear layer at batch 64 (8 px), where the framework's per-step
  cost is all there is to see: microseconds per step, distnn minus bare.
- weak scaling: torchrun with 1 and 2 processes of one thread each (DDP over gloo on CPU;
  one launch per process count times every row), the same per-process batch;
  efficiency = images/s at 2 ÷ (2 × images/s at 1); also with gradient accumulation 2 (half
  the all-reduces).
- FSDP vs DDP: in the same 2-process launch, distnn's FSDP2 strategy (each block sharded,
  then the root; the model built eagerly and then sharded, since only the step is timed)
  against DDP on the same model, per-process batch and data, from the same weights; passes
  alternate ABBA, images/s and the ratio FSDP / DDP per pair; at the end both must hold the
  same weights (FSDP's gathered). The quick run times the tutorial CNN only.
On CUDA, ResNet-50 at 224 px runs in bf16 with channels_last as well. On a CPU without bf16
instructions (avx512_bf16, AMX) the bf16 rows are left out, and the table says so.
Writes results/train_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import describe, machine, parser, save, summarize, torchrun_job
from distnn import checkpoint, config, models, monitor, optim, parallel, preempt
from distnn import precision as precision_lib
from distnn.data import Loaders
from distnn.engine import Engine, Position
from distnn.parallel import dist

MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


class MemoryBatches:
    """The same uint8 batch `steps` times from memory: a loader that costs nothing. Also
    the sampler (set_epoch, steps) the engine expects."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            yield self.x, self.y


def build_model(name: str, size: int) -> nn.Module:
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 10))
    return models.build(name, 10, size)


class Case:
    """One model × batch × precision, ready to run `steps` optimizer steps either way."""

    def __init__(self, name: str, size: int, batch: int, precision: str, steps: int,
                 accum: int = 1, run_dir: Path | None = None, log_every: int = 10,
                 strategy: str = "auto") -> None:  # fmt: skip
        self.env = parallel.detect()
        self.device = dist.device_for(self.env)
        channels_last = precision != "fp32" and self.device.type == "cuda"
        self.cfg = config.load(None, [
            f"run.dir={run_dir}", "run.name=bench", "log.progress=off",
            "log.wandb.mode=disabled", "log.tensorboard=false", f"train.batch_size={batch}",
            f"train.accum_steps={accum}", f"train.max_steps={steps}",
            f"train.log_every={log_every}",
            "ckpt.epoch_end=false", "ckpt.resume=never", f"precision={precision}",
            f"model.channels_last={channels_last}", "sched.warmup_steps=0",
            f"strategy.name={strategy}",
        ])  # fmt: skip
        self.precision = precision_lib.build(precision, self.device)
        self.name, self.size, self.batch, self.accum, self.steps = name, size, batch, accum, steps
        self.log_every = log_every
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        if self.device.type == "cuda":
            x = x.pin_memory()
        self.x, self.y = x, torch.randint(0, 10, (batch,), generator=g)
        torch.manual_seed(0)
        self.init = build_model(name, size).to(self.device)
        if channels_last:
            self.init = self.init.to(memory_format=torch.channels_last)

    def _recipe(self) -> tuple[optim.Optimizers, optim.Schedule]:
        global_batch = self.batch * self.accum * self.env.world_size
        return optim.Optimizers(self.cfg.optim, global_batch), optim.Schedule(self.cfg.sched, 10**6)

    def distnn(self) -> tuple[Engine, nn.Module]:
        model = copy.deepcopy(self.init)
        strategy = parallel.build(self.cfg, self.env, self.device, self.precision)
        forward = strategy.setup(model, *self._recipe())
        batches = MemoryBatches(self.x, self.y, self.steps * self.accum)
        loaders = Loaders(train=batches, val=[], train_order=batches, classes=list("0123456789"),
                          mean=MEAN, std=STD, train_size=len(batches) * self.batch,
                          val_size=0)  # fmt: skip
        run = monitor.Run(self.cfg, self.env, self.steps)
        ckpt = checkpoint.Manager(self.cfg.ckpt, self.cfg.run_dir, writes=False)
        engine = Engine(self.cfg, strategy, forward, loaders, self.precision, self.device, run,
                        ckpt, preempt.Watcher(self.cfg.dist.timeout_s))  # fmt: skip
        return engine, model

    def run_distnn(self, engine: Engine) -> int:
        engine.pos = Position()
        engine.train_epoch()
        self._sync()
        assert engine.pos.step == self.steps
        return self.steps * self.batch * self.accum

    def bare(self) -> nn.Module:
        model = copy.deepcopy(self.init)
        optimizers, schedule = self._recipe()
        self.bare_opt = optimizers(model)
        self.bare_model, self.bare_sched = model, schedule(self.bare_opt)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(MEAN, device=self.device).view(shape)
        self.inv_std = 1.0 / torch.tensor(STD, device=self.device).view(shape)
        return model

    def run_bare(self) -> int:
        model, opt, sched = self.bare_model, self.bare_opt, self.bare_sched
        memory_format = torch.channels_last if self.cfg.model.channels_last else None
        for _ in range(self.steps):
            x = self.x.to(self.device, non_blocking=True)
            y = self.y.to(self.device, non_blocking=True)
            x = (x.float() - self.mean) * self.inv_std
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            with self.precision.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        self._sync()
        return self.steps * self.batch

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def assert_same_work(case: Case) -> float:
    """From the same weights, distnn's steps and the bare loop's end on the same weights; the
    largest difference of any weight."""
    engine, a = case.distnn()
    b = case.bare()
    case.run_distnn(engine)
    case.run_bare()
    engine.run.close()
    diff = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{case.name}: {name}")
        diff = max(diff, (p - q).abs().max().item())
    return diff


def abba(pair: list, i: int) -> list:
    """The pair in ABBA order: as given in even passes, reversed in odd ones."""
    return pair if i % 2 == 0 else pair[::-1]


def compare(case: Case, repeats: int) -> dict:
    """Alternating timed passes of distnn and the bare loop (after one warm-up each). Both
    pass the same model, batch and number of steps; in fp32 they also end on the same weights
    (bf16 autocast rounds in a different order in each: there the counts are the check)."""
    fp32 = case.precision.name == "fp32"
    diff = assert_same_work(case) if fp32 else None
    engine, _ = case.distnn()
    case.bare()
    images = {"distnn": case.run_distnn(engine), "bare": case.run_bare()}
    assert images["distnn"] == images["bare"] == case.steps * case.batch
    ours, theirs = [], []
    for i in range(repeats):
        pair = [(ours, lambda: case.run_distnn(engine)), (theirs, case.run_bare)]
        for rates, fn in abba(pair, i):
            t = time.perf_counter()
            n = fn()
            rates.append(n / (time.perf_counter() - t))
    engine.run.close()
    return {
        "model": case.name, "image_size": case.size, "batch": case.batch,
        "precision": case.precision.name, "steps": case.steps, "log_every": case.log_every,
        "order": "ABBA",
        "same_work_checked": "images and final weights" if fp32 else "images",
        "images_per_pass": images, "max_abs_weight_diff": diff,
        "distnn": summarize(ours), "bare": summarize(theirs),
        "ratio": summarize([a / b for a, b in zip(ours, theirs, strict=True)]),
        "overhead_us_per_step": summarize([
            (1 / a - 1 / b) * case.batch * 1e6 for a, b in zip(ours, theirs, strict=True)
        ]),
    }  # fmt: skip


def scaling_worker(args: argparse.Namespace) -> None:
    """One torchrun process: for each (model, batch, accum, steps) of the plan, time `repeats`
    passes of `steps` DDP steps in one process group; then each (model, batch, steps) of
    `versus`, FSDP against DDP; rank 0 reports."""
    env = parallel.detect()
    reports, versus = [], []
    with tempfile.TemporaryDirectory() as tmp, dist.process_group(env, config.load(None).dist):
        for model, batch, accum, steps in json.loads(args.plan):
            case = Case(model, 32, batch, "fp32", steps, accum, Path(tmp))
            engine, _ = case.distnn()
            case.run_distnn(engine)
            rates = []
            for _ in range(args.repeats):
                dist.barrier()
                t = time.perf_counter()
                n = case.run_distnn(engine)
                rates.append(n * env.world_size / (time.perf_counter() - t))
            engine.run.close()
            reports.append(summarize(rates))
        for model, batch, steps in json.loads(args.versus):
            versus.append(fsdp_vs_ddp(model, batch, steps, args.repeats, Path(tmp)))
        initialized = torch.distributed.is_initialized()  # not for a lone process
        backend = torch.distributed.get_backend() if initialized else None
    if env.is_main:
        out = {"backend": backend, "rows": reports, "versus": versus}
        Path(args.worker).write_text(json.dumps(out))


def fsdp_vs_ddp(model: str, batch: int, steps: int, repeats: int, run_dir: Path) -> dict:
    """Images/s (all ranks) of FSDP and of DDP on the same model, per-process batch and data
    from the same weights, passes in ABBA order after a warm-up of each; the ratio per pair.
    Both have then done the same steps: their weights must agree."""
    cases = {name: Case(model, 32, batch, "fp32", steps, run_dir=run_dir, strategy=name)
             for name in ("ddp", "fsdp")}  # fmt: skip
    built = {name: case.distnn() for name, case in cases.items()}
    world = cases["ddp"].env.world_size
    rates: dict[str, list[float]] = {"ddp": [], "fsdp": []}

    def timed(name: str) -> None:
        dist.barrier()
        t = time.perf_counter()
        n = cases[name].run_distnn(built[name][0])
        rates[name].append(n * world / (time.perf_counter() - t))

    for name in cases:  # warm-up
        cases[name].run_distnn(built[name][0])
    for i in range(repeats):
        for name in abba(["ddp", "fsdp"], i):
            timed(name)
    # FSDP's parameters are shards (DTensors): every rank gathers them, the collective way.
    ddp_params = dict(built["ddp"][1].named_parameters())
    diff = 0.0
    for name, p in built["fsdp"][1].named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        q = ddp_params[name]
        torch.testing.assert_close(full, q, rtol=1e-4, atol=1e-5, msg=f"{model}: {name}")
        diff = max(diff, (full - q).abs().max().item())
    strategies = {}
    for name, (engine, _) in built.items():
        strategies[name] = engine.strategy.describe()
        engine.run.close()
    pairs = zip(rates["fsdp"], rates["ddp"], strict=True)
    return {"model": model, "batch": batch, "steps": steps, "order": "ABBA",
            "strategies": strategies, "ddp": summarize(rates["ddp"]),
            "fsdp": summarize(rates["fsdp"]), "ratio": summarize([f / d for f, d in pairs]),
            "same_work_checked": "images and final weights",
            "max_abs_weight_diff": diff}  # fmt: skip


def scaling(plan: list[tuple], nproc: int, repeats: int, versus: list[tuple] = ()) -> dict:
    """Images/s of each row of the plan on `nproc` processes (one launch for all of them),
    and the process group's backend; with `versus` rows, FSDP against DDP in the same launch."""
    args = [f"--plan={json.dumps(plan)}", f"--versus={json.dumps(list(versus))}",
            f"--repeats={repeats}"]  # fmt: skip
    # A hang's limit, not a budget.
    timeout = 300 + 120 * (len(plan) + 2 * len(versus)) * (repeats + 1)
    return torchrun_job("benchmarks.train_throughput", nproc, args, timeout, OMP_NUM_THREADS="1")


def scaled_models(quick: bool) -> list[tuple[str, int, int]]:
    """(model, batch per process, steps) of the 2-process rows: scaling and FSDP vs DDP."""
    return [("tutorial_cnn", 64, 4 if quick else 30)] + ([] if quick else [("resnet18", 32, 10)])


def run_fsdp_only(repeats: int, out: Path) -> dict:
    """FSDP against DDP alone (full size), put into the results already in `out` in place of
    their FSDP rows: the other rows stay as recorded, under their own machine line, and these
    get one of their own (for a machine where the rest cannot be re-measured as it was: bf16
    emulated, or others' load on the cores that the 2-thread rows would time)."""
    path = out / "train_throughput.json"
    if not path.is_file():
        raise SystemExit(f"--fsdp-only adds to a full run's results: no {path}")
    results = json.loads(path.read_text())
    if results["quick"]:
        raise SystemExit(f"--fsdp-only adds to a full run's results: {path} is a quick run's")
    results["fsdp_vs_ddp_machine"], results["fsdp_vs_ddp_repeats"] = machine(), repeats
    double = scaling([], 2, repeats, scaled_models(False))
    results["fsdp_vs_ddp"] = double["versus"]
    _print_fsdp(results)
    return save(out, "train_throughput", results, markdown, stamp="fsdp_vs_ddp_machine")


def _print_fsdp(results: dict) -> None:
    for r in results["fsdp_vs_ddp"]:
        print(f"{r['model']:12} 2 procs: FSDP {r['fsdp']['median']:.0f} img/s, DDP "
              f"{r['ddp']['median']:.0f}, ratio {r['ratio']['median']:.3f} "
              f"({r['ratio']['min']:.3f} - {r['ratio']['max']:.3f})", flush=True)  # fmt: skip


def run(quick: bool, repeats: int, out: Path) -> dict:
    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats}
    cuda = torch.cuda.is_available()
    # The one-Linear model twice: logging every 10 steps (the default: a loss all-reduce and
    # .item(), grad norm, a JSON line) and every 1000 (the per-step cost of the loop alone).
    cases = [("linear", 8, 64, "fp32", 200 if quick else 1000, 1000),
             ("linear", 8, 64, "fp32", 200 if quick else 1000),
             ("tutorial_cnn", 32, 64, "fp32", 4 if quick else 30),
             ("tutorial_cnn", 32, 64, "bf16", 4 if quick else 30),
             ("resnet18", 32, 16 if quick else 32, "fp32", 2 if quick else 10),
             ("resnet18", 32, 16 if quick else 32, "bf16", 2 if quick else 10)]  # fmt: skip
    if not quick:
        cases.append(("resnet50", 224, 64 if cuda else 4, "fp32", 20 if cuda else 3))
    if cuda:
        cases.append(("resnet50", 224, 128, "bf16", 20 if quick else 50))
    if not cuda and not precision_lib.cpu_has_bf16():
        # Emulated bf16 (no avx512_bf16 or AMX) runs ~25x slower than fp32: rows that would
        # time the emulation, for minutes of CI (quick) or about an hour (full: resnet18).
        cases = [c for c in cases if c[3] != "bf16"]
        results["skipped"] = "bf16 rows: this CPU has no avx512_bf16 or AMX (bf16 is emulated)"
    results["compare"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, batch, prec, steps, *log_every in cases:
            every = log_every[0] if log_every else 10
            case = Case(name, size, batch, prec, steps, run_dir=Path(tmp), log_every=every)
            row = compare(case, repeats)
            results["compare"].append(row)
            print(f"{name:12} {prec} batch {batch:3} log/{every}: distnn "
                  f"{row['distnn']['median']:8.0f} img/s, bare {row['bare']['median']:8.0f}, ratio "
                  f"{row['ratio']['median']:.3f}", flush=True)  # fmt: skip
    models = scaled_models(quick)
    plan = [(model, batch, accum, steps) for model, batch, steps in models for accum in (1, 2)]
    # FSDP against DDP (accumulation 1) rides on the 2-process launch: no start of its own.
    single, double = scaling(plan, 1, repeats), scaling(plan, 2, repeats, models)
    results["scaling_backend"], results["scaling"] = double["backend"], []
    for (model, batch, accum, steps), one, two in zip(
        plan, single["rows"], double["rows"], strict=True
    ):
        efficiency = two["median"] / (2 * one["median"])
        row = {"model": model, "batch": batch, "accum": accum, "steps": steps,
               "one": one, "two": two, "efficiency": efficiency}  # fmt: skip
        results["scaling"].append(row)
        print(f"{model:12} accum {accum}: 1 proc {one['median']:.0f} img/s, "
              f"2 procs {two['median']:.0f}, efficiency {row['efficiency']:.2f}",
              flush=True)  # fmt: skip
    results["fsdp_vs_ddp"] = double["versus"]
    _print_fsdp(results)
    return save(out, "train_throughput", results, markdown)


def markdown(results: dict) -> str:
    quick = " (quick run)" if results["quick"] else ""
    # Rows recorded before the order was ABBA alternated AB AB.
    abba_note = " (ABBA)" if all(r.get("order") == "ABBA" for r in results["compare"]) else ""
    lines = [
        "# Training throughput (images/s)",
        "",
        f"{describe(results['machine'])}{quick} Median of {results['repeats']} alternating "
        f"passes{abba_note} after a warm-up (min – max). Same model, batch, optimizer and "
        "in-memory data; both pass the same number of images, and fp32 rows are checked to "
        "end on the same weights. distnn runs with TensorBoard and W&B off (log.tensorboard="
        "false, log.wandb.mode=disabled): timed are its loop, strategy and metrics.jsonl "
        "records every `log every` steps, not the trackers.",
        "",
        *([f"Skipped: {results['skipped']}.", ""] if "skipped" in results else []),
        "| model | px | batch | precision | log every | distnn | bare loop | distnn ÷ bare "
        "| overhead µs/step |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["compare"]:
        d, b, q, o = r["distnn"], r["bare"], r["ratio"], r["overhead_us_per_step"]
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['precision']} "
            f"| {r['log_every']} | {d['median']:,.0f} ({d['min']:,.0f} – {d['max']:,.0f}) "
            f"| {b['median']:,.0f} ({b['min']:,.0f} – {b['max']:,.0f}) "
            f"| {q['median']:.3f} ({q['min']:.3f} – {q['max']:.3f}) | {o['median']:+,.0f} |"
        )
    lines += ["", f"Weak scaling, DDP over {results['scaling_backend']}, one thread per process, "
              "per-process batch fixed:",
              "", "| model | batch/process | accum | 1 process | 2 processes | efficiency |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results["scaling"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['accum']} | {r['one']['median']:,.0f} "
            f"| {r['two']['median']:,.0f} | {r['efficiency']:.2f} |"
        )
    apart = results.get("fsdp_vs_ddp_machine")  # run with --fsdp-only, after the rest
    repeats = results.get("fsdp_vs_ddp_repeats", results["repeats"])
    lines += ["", *([f"Run apart from the tables above (`--fsdp-only`): {describe(apart)}", ""]
                    if apart else []),
              f"FSDP against DDP, 2 processes over {results['scaling_backend']}, one thread "
              "each, the same per-process batch and data from the same weights (checked to end "
              f"on the same weights); images/s, median of {repeats} passes in ABBA "
              "order (min – max):",
              "", "| model | batch/process | steps | DDP | FSDP | FSDP ÷ DDP |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results["fsdp_vs_ddp"]:
        d, f, q = r["ddp"], r["fsdp"], r["ratio"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['steps']} "
            f"| {d['median']:,.0f} ({d['min']:,.0f} – {d['max']:,.0f}) "
            f"| {f['median']:,.0f} ({f['min']:,.0f} – {f['max']:,.0f}) "
            f"| {q['median']:.3f} ({q['min']:.3f} – {q['max']:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser("benchmarks.train_throughput", __doc__, "a CI-sized run (fewer steps)")
    p.add_argument("--plan", help=argparse.SUPPRESS)  # a worker's JSON rows to time
    p.add_argument("--versus", default="[]", help=argparse.SUPPRESS)  # rows: FSDP vs DDP
    p.add_argument(
        "--fsdp-only",
        action="store_true",
        help="time FSDP against DDP alone and put those rows into OUT/train_throughput.json "
        "(a full run's), beside the rows recorded there, with a machine line of their own",
    )
    args = p.parse_args(argv)
    if args.worker:
        scaling_worker(args)
        return
    if args.fsdp_only:
        print(markdown(run_fsdp_only(args.repeats, args.out)))
        return
    print(markdown(run(args.quick, args.repeats, args.out)))


if __name__ == "__main__":
    main(sys.argv[1:])
