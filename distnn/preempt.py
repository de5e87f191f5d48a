"""Preemption: a signal sets a flag; the loop stops at a step boundary all ranks agree on.

The handler only sets a flag. Checkpointing inside a signal handler can deadlock (the handler
may interrupt a collective or a lock holder), so the loop polls the flag between steps instead.
Ranks receive signals at different moments, so they agree through one small all-reduce of the
flag per step. It runs on CPU tensors over gloo and asynchronously — started at step t, read
at step t+1 — so it never waits on the GPU: not a host sync in the hot path.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Iterable

import torch
import torch.distributed as td

# SIGUSR1: what our sbatch scripts request (--signal=B:USR1@120); SIGUSR2: submitit's;
# SIGTERM: what schedulers and torchrun send before a kill.
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# EX_TEMPFAIL from sysexits.h: "temporary failure, retry later" — what a preempted run is.
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


class Watcher:
    def __init__(self, timeout_s: float, signals: Iterable[signal.Signals] = SIGNALS) -> None:
        self.flag = False
        self.signum: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in signals}
        self.group = None
        self.pending: td.Work | None = None
        self.buffer = torch.zeros(1)
        if td.is_initialized() and td.get_world_size() > 1:
            # A CPU (gloo) group even when training runs on NCCL: polling it needs no GPU sync.
            self.group = (
                None
                if td.get_backend() == "gloo"
                else td.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
            )
            self._start()

    def _handle(self, signum: int, frame: object) -> None:
        self.flag = True
        self.signum = signum

    def _start(self) -> None:
        self.buffer = torch.tensor([1.0 if self.flag else 0.0])
        self.pending = td.all_reduce(self.buffer, group=self.group, async_op=True)

    def poll(self) -> bool:
        """Whether the job stops at this step boundary: on every rank the same answer."""
        if self.pending is None:
            return self.flag
        self.pending.wait()
        agreed = self.buffer.item() > 0
        if not agreed:
            self._start()
        else:
            self.pending = None
        return agreed

    def close(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def requeue_command(environ: dict[str, str] | None = None) -> list[str] | None:
    """`scontrol requeue <job>` under Slurm; None elsewhere, and under submitit, which
    requeues through its own checkpoint() hook."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID")
    job_id = (
        f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        if job
        else env.get("SLURM_JOB_ID")
    )
    if not job_id or env.get("SUBMITIT_EXECUTOR"):
        return None
    return ["scontrol", "requeue", job_id]


def requeue() -> None:
    command = requeue_command()
    if command is None:
        return
    # Said before it runs: a requeue that works ends this job's processes, often before
    # scontrol's answer arrives here.
    print(f"preempted: {' '.join(command)}", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    status = "requeued" if result.returncode == 0 else f"requeue failed: {result.stderr.strip()}"
    print(f"preempted: {status}", file=sys.stderr, flush=True)
