"""Submit a training run to Slurm (or run it here) with submitit: `python -m distnn.submit`.

    python -m distnn.submit --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu \\
        --config configs/imagenet_resnet50.yaml train.epochs=90
    python -m distnn.submit --local --tasks-per-node 2 --wait --config configs/digits.yaml

The job runs one task per process (per GPU, or --tasks-per-node); every task exports torch's
env:// variables from submitit's view of the job and calls distnn.train. Without run.name the
run is <job name>-<job id>. Preemption: submitit asks Slurm for USR2 120 s before the time
limit; distnn's watcher turns it into a checkpoint at the next step boundary and an exit, and
the job then hands over to submitit, which resubmits `checkpoint()` — the same run with
ckpt.resume=auto — and requeues the job, which resumes in the same run directory.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import submitit
from submitit.core.utils import UncompletedJobError

from distnn import config
from distnn.errors import UserError, cli


class TrainJob(submitit.helpers.Checkpointable):
    """What every task of the job calls: one distnn.train run."""

    def __init__(
        self, config_path: str | None, overrides: list[str], run_prefix: str | None, threads: int
    ) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.run_prefix = run_prefix  # set when run.name was not given: run <prefix>-<job id>
        self.threads = threads

    def __call__(self) -> dict[str, Any]:
        import torch

        from distnn.preempt import Preempted
        from distnn.train import train

        # Threads per process: the CPUs each task was given (default 1, as torchrun sets), not
        # every core of the node: 2 tasks of 2 threads each on 2 cores trained 10x slower.
        torch.set_num_threads(self.threads)
        # Devices stay cuda:<local rank>, as under torchrun: no per-task CUDA_VISIBLE_DEVICES.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        job_id = submitit.JobEnvironment().job_id  # the same after a requeue: so is the run
        named = [f"run.name={self.run_prefix}-{job_id}"] if self.run_prefix else []
        cfg = config.load(self.config_path, [*self.overrides, *named])
        try:
            return train(cfg)
        except Preempted:
            # The checkpoint is saved. The watcher put submitit's own handler back on its way
            # out: run it, as the signal would have. On rank 0 it calls checkpoint() and
            # requeues the job, then exits; other ranks just exit.
            preempt_signal = submitit.JobEnvironment._usr_sig()
            handler = signal.getsignal(preempt_signal)
            if callable(handler):
                handler(preempt_signal, None)
            raise

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """The resubmission submitit requeues: the same run, resumed from its checkpoints."""
        overrides = [*self.overrides, "ckpt.resume=auto"]
        resumed = TrainJob(self.config_path, overrides, self.run_prefix, self.threads)
        return submitit.helpers.DelayedSubmission(resumed)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (python -m distnn.submit -h)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m distnn.submit",
        description="Submit distnn.train to Slurm with submitit (or run it here with --local); "
        "overrides are dotted key=value pairs.",
    )
    p.add_argument("--config", help="YAML preset (configs/*.yaml)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    p.add_argument(
        "--tasks-per-node", type=int, help="processes per node (default: one per GPU, else 1)"
    )
    p.add_argument("--cpus-per-task", type=int, help="CPUs per process (Slurm's default: 1)")
    p.add_argument("--time", default="60", help="time limit: minutes or H:MM:SS (default 60)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument("--account", help="Slurm account to charge")
    p.add_argument("--mem", type=float, help="memory per node, GB (default: the cluster's)")
    p.add_argument("--name", default="distnn", help="job name (default distnn)")
    p.add_argument(
        "--log-dir", default="logs/submitit", help="submitit's folder: a subfolder per job"
    )
    p.add_argument("--local", action="store_true", help="run here, with submitit's local executor")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its summary")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def minutes(text: str) -> int:
    """A time limit as whole minutes: `90` or `1:30:00`."""
    parts = text.split(":")
    if len(parts) not in (1, 3) or not all(part.isdigit() for part in parts):
        raise UserError(f"--time {text!r} is not minutes or H:MM:SS")
    if len(parts) == 1:
        total = int(text)
    else:
        hours, mins, secs = map(int, parts)
        total = hours * 60 + mins + (secs > 0)  # a part-minute is a whole one: never shorter
    if total < 1:
        raise UserError(f"--time {text!r} is shorter than a minute")
    return total


def check(args: argparse.Namespace) -> None:
    least = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1}
    for key, smallest in least.items():
        value = getattr(args, key)
        if value is not None and value < smallest:
            raise UserError(f"--{key.replace('_', '-')} {value} is less than {smallest}")
    if args.mem is not None and args.mem <= 0:
        raise UserError(f"--mem {args.mem:g} is not a positive number of GB")
    if args.local and args.nodes > 1:
        raise UserError(f"--local runs on this machine: --nodes {args.nodes} needs Slurm")


def executor(
    args: argparse.Namespace, tasks_per_node: int, timeout_min: int
) -> submitit.AutoExecutor:
    # AutoExecutor picks Slurm whenever sbatch is on PATH: say which one.
    ex = submitit.AutoExecutor(
        folder=Path(args.log_dir) / "%j", cluster="local" if args.local else "slurm"
    )
    params: dict[str, Any] = {
        "name": args.name,
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node,
        "gpus_per_node": args.gpus_per_node,
        "timeout_min": timeout_min,
        "slurm_signal_delay_s": 120,  # the notice our sbatch scripts ask for too
    }
    if args.cpus_per_task is not None:
        params["cpus_per_task"] = args.cpus_per_task
        # Slurm 22.05's srun ignores sbatch's --cpus-per-task: repeat it for the tasks.
        params["slurm_srun_args"] = [f"--cpus-per-task={args.cpus_per_task}"]
    if args.mem is not None:
        params["mem_gb"] = args.mem
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.account:
        params["slurm_account"] = args.account
    ex.update_parameters(**params)
    return ex


def reason(error: Exception) -> str:
    """One line for why a job failed: the last line of the trace submitit quotes, if any."""
    quoted = str(error).split("-" * 22)
    text = quoted[1] if len(quoted) > 2 else quoted[0]
    lines = text.strip().splitlines() or [type(error).__name__]
    return lines[-1] if len(quoted) > 2 else lines[0]


@cli
def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parser().parse_args(argv)
    check(args)
    timeout_min = minutes(args.time)
    # Errors in the config show here, one line, not in a job log an hour later.
    cfg = config.load(args.config, args.overrides)
    run_prefix = args.name if cfg.run.name == config.RunConfig().name else None
    # Tasks may start elsewhere than here: give them absolute paths.
    run_parent = Path(cfg.run.dir).resolve()
    overrides = [*args.overrides, f"run.dir={run_parent}"]
    tasks_per_node = args.tasks_per_node or max(1, args.gpus_per_node)
    ex = executor(args, tasks_per_node, timeout_min)
    config_path = str(Path(args.config).resolve()) if args.config else None
    job = ex.submit(TrainJob(config_path, overrides, run_prefix, args.cpus_per_task or 1))
    run_dir = run_parent / (f"{run_prefix}-{job.job_id}" if run_prefix else cfg.run.name)
    where = "here" if args.local else "to Slurm"
    print(f"submitted job {job.job_id} {where}: {args.nodes} node(s) x {tasks_per_node} task(s)")
    print(f"  run dir: {run_dir}")
    print(f"  stdout:  {job.paths.stdout}")
    print(f"  stderr:  {job.paths.stderr}", flush=True)
    if not args.wait:
        return None
    try:
        result = job.results()[0]  # rank 0's; every task returns the same summary
    except UncompletedJobError as e:
        raise SystemExit(
            f"error: job {job.job_id} failed: {reason(e)} (see {job.paths.stderr})"
        ) from None
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
