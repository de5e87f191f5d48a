"""Train a model: `python -m distnn.train` (one process) or `torchrun -m distnn.train` (many).

python -m distnn.train --config configs/cifar10_resnet18.yaml optim.lr=0.05 train.epochs=3
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
from typing import Any

import numpy as np
import torch

from distnn import (
    checkpoint,
    config,
    data,
    mixing,
    models,
    monitor,
    optim,
    parallel,
    preempt,
    resume,
    runlock,
)
from distnn import precision as precision_lib
from distnn.config import Config
from distnn.ema import Averaging
from distnn.engine import Engine, total_steps
from distnn.errors import UserError, cli
from distnn.monitor.watchdog import flight_recorder
from distnn.parallel import dist


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def num_classes(cfg: Config, classes: list[str]) -> int:
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(classes):
        raise UserError(
            f"model.num_classes={cfg.model.num_classes} does not match the data: "
            f"data.source={cfg.data.source} has {len(classes)} classes"
        )
    return len(classes)


def finished(cfg: Config, step: int) -> dict[str, Any] | None:
    """The summary of a run that ended at `step`; None where the attempt that reached it
    stopped before writing one (it evaluates and writes it when resumed)."""
    try:
        summary = json.loads((cfg.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("steps") == step else None


def configure_kernels(cfg: Config, device: torch.device) -> None:
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_model(model: torch.nn.Module, device: torch.device, run: monitor.Run) -> Any:
    """torch.compile where it can work; elsewhere the eager model, with a note saying why."""
    import torch._dynamo

    why = None
    if not torch._dynamo.is_dynamo_supported():
        why = "torch.compile is not supported on this Python/platform"
    elif device.type == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        why = "inductor needs a C++ compiler for CPU code and none is on PATH"
    if why is not None:
        run.message(f"model.compile=true ignored: {why}; running eagerly")
        return model
    return torch.compile(model)


def train(
    cfg: Config, given_model: models.ModelArg = None, datasets: tuple[Any, Any] | None = None
) -> dict[str, Any]:
    """Run `cfg`; `given_model` (a module or factory) and `datasets` (train, val) are what
    distnn.fit takes in place of model.name and data.source."""
    # Everything that can be wrong with the input is checked before a process group forms.
    env = parallel.detect()
    cfg = config.for_world(cfg, env.world_size, env.local_world_size)
    with runlock.hold(cfg.run_dir, enabled=env.is_main):  # one job per run directory
        return _train(cfg, env, given_model, datasets)


def _train(
    cfg: Config, env: parallel.Env, given_model: models.ModelArg, datasets: tuple[Any, Any] | None
) -> dict[str, Any]:
    device = dist.use_device(env)
    precision = precision_lib.build(cfg.precision, device)
    configure_kernels(cfg, device)
    loaders = data.build(cfg, env, pin_memory=device.type == "cuda", datasets=datasets)
    ckpt = checkpoint.Manager(cfg.ckpt, cfg.run_dir, env.is_main)
    state = ckpt.restore()
    if state is not None:
        resume.check_compatible(state, cfg, loaders.classes, ckpt.restored_from, env.world_size)
    strategy = parallel.build(cfg, env, device, precision)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model, head, model_notes = models.prepare(
        cfg,
        num_classes(cfg, loaders.classes),
        device,
        given_model,
        fresh=state is None,
        meta_init=strategy.meta_init,
    )
    steps = total_steps(cfg, loaders)
    optimizers = optim.Optimizers(cfg.optim, config.global_batch(cfg, env.world_size), head)
    optimizers.groups(model)  # a bad optimizer setting is one line before the group forms
    schedule = optim.Schedule(cfg.sched, steps)
    mixer = mixing.build_mixer(cfg.train, len(loaders.classes), env.rank)
    start = state["position"]["step"] if state else 0
    done = finished(cfg, start) if start >= steps else None
    if done is not None:  # nothing is written: the run directory stays as the run left it
        if env.is_main:
            print(
                f"nothing to do: {cfg.run_dir} already reached step {start} of {steps} "
                "(raise train.max_steps or train.epochs to continue it)",
                flush=True,
            )
        return done

    ckpt.discard_lost(state)  # after every check of the input: a refused run removes nothing

    flight_recorder(cfg.run_dir)  # every collective recorded: what a hang waits in
    with dist.process_group(env, cfg.dist, alone=strategy.collective):
        forward = run = preemption = engine = watching = None
        try:
            # Nodes with run directories of their own may hold different checkpoints.
            dist.agree(start, "the step they resume from", "give every node one run directory")
            forward = strategy.setup(model, optimizers, schedule, Averaging(cfg.train))
            seed_everything(cfg.train.seed + env.rank)  # dropout and friends differ per rank
            run = monitor.Run(cfg, env, steps, start)
            run.message(f"strategy: {strategy.describe()}")
            for note in model_notes:
                run.message(note)
            if precision.warning:
                run.message(precision.warning)
            if cfg.model.compile:
                forward = compile_model(forward, device, run)
            preemption = preempt.Watcher(cfg.dist.timeout_s)
            engine = Engine(
                cfg, strategy, forward, loaders, precision, device, run, ckpt, preemption,
                loss=mixing.build_loss(cfg.train), mixer=mixer,
            )  # fmt: skip
            watching = monitor.watch(cfg, engine.ranks, run, device, lambda: preemption.flag)
            if state is not None:
                engine.load_state_dict(state)
                run.message(f"resumed at step {start} from {ckpt.origin}")
                for note in resume.resume_notes(state, cfg, env.world_size):
                    run.message(note)
            summary = engine.fit()
            watching.close()  # no hang reports while the uploads finish; the trace written
            ckpt.finish(device)  # the bucket holds the last checkpoint before any rank exits
            run.summary(summary)
            top1 = summary.get("val_top1", float("nan"))
            run.message(f"done: {summary['steps']} steps, val_top1 {top1:.4f} -> {cfg.run_dir}")
        except preempt.Preempted:
            run.message(f"preempted at step {engine.pos.step}: checkpoint saved, exiting 75")
            ckpt.finish(device, cfg.ckpt.upload_wait_s)  # the requeue ends this job
            if env.is_main and cfg.ckpt.requeue:
                preempt.requeue()
            raise
        finally:
            try:  # closing the run writes too, and a full disk fails it: the strategy still goes
                if watching is not None:  # the profile window's trace is written here
                    watching.close()
                if preemption is not None:
                    preemption.close()
                ckpt.close()
                if run is not None:
                    run.close()
            finally:
                # Nothing may hold the process group's work when the group goes (DeepSpeed's
                # engine, collected at interpreter exit, sometimes aborts the process there).
                del engine, forward, model
                strategy.close()
                gc.collect()
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distnn.train",
        description="Train an image classifier; overrides are dotted key=value pairs.",
    )
    p.add_argument("--config", help="YAML preset (configs/*.yaml); defaults apply without it")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("--help-config", action="store_true", help="list every config key, exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


@cli
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.help_config:
        print(config.help_table())
        return
    cfg = config.load(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
