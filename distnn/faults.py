"""Fault injection, for testing what a failure does to a real run.

    DISTNN_FAULT=raise@step:3,rank:1    rank 1 raises an exception after optimizer step 3
    DISTNN_FAULT=crash@step:3,rank:1    rank 1 dies at once (os._exit), as a killed node would
    DISTNN_FAULT=kill@step:3,rank:1     rank 1 SIGKILLs itself (nothing flushed or closed)
    DISTNN_FAULT=nan@step:3,rank:1      rank 1's loss in step 3 is NaN (a diverging batch)
    DISTNN_FAULT=kill@upload:8          the uploading process (rank 0) SIGKILLs itself once the
                                        first object of step 8's checkpoint is in ckpt.remote
    DISTNN_FAULT=slow@rank:1,ms:200     rank 1 sleeps 200 ms every time it enters the compute
                                        phase (,phase:data: the data phase)
    DISTNN_FAULT=hang@step:20,rank:1    rank 1 sleeps forever in step 20's compute phase
                                        (,phase:data: its data phase)

The fault fires only in the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT=0),
so a restarted group can show that it recovers.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from distnn.errors import UserError

_SPEC = re.compile(r"^(raise|crash|kill|nan)@step:(\d+),rank:(\d+)$|^kill@upload:(\d+)$")
_PHASED = re.compile(
    r"^(?:slow@rank:(?P<rank>\d+),ms:(?P<ms>\d+)|hang@step:(?P<step>\d+),rank:(?P<hang>\d+))"
    r"(?:,phase:(?P<phase>data|compute))?$"
)
CRASH_EXIT_CODE = 86


@dataclass
class Fault:
    kind: str
    step: int
    rank: int
    phase: str = "step"  # or "upload": of the checkpoint of `step`; or a loop phase
    fired: bool = False  # once: a skipped step is retried with the same step number
    ms: int = 0  # slow: the sleep each time the rank enters the phase

    def check(self, step: int, rank: int, phase: str = "step") -> None:
        """After optimizer step `step` (or the first object of its checkpoint's upload):
        raise or crash."""
        if (step, rank, phase) != (self.step, self.rank, self.phase) or self.kind == "nan":
            return
        if self.kind == "crash":
            os._exit(CRASH_EXIT_CODE)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault (DISTNN_FAULT) on rank {rank} at step {step}")

    def enter(self, phase: str, step: int, rank: int) -> None:
        """As rank `rank` enters `phase` of step `step`: slow sleeps, hang never returns."""
        if phase != self.phase or rank != self.rank:
            return
        if self.kind == "slow":
            time.sleep(self.ms / 1000)
        elif self.kind == "hang" and step == self.step:
            while True:  # as a stuck rank: alive, never arriving
                time.sleep(3600)

    def corrupt(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """During step `step`: the loss, or NaN for the nan fault."""
        if self.kind == "nan" and step == self.step and rank == self.rank and not self.fired:
            self.fired = True
            return loss * math.nan
        return loss


def from_env(environ: Mapping[str, str] | None = None) -> Fault | None:
    env = os.environ if environ is None else environ
    spec = env.get("DISTNN_FAULT", "")
    if not spec or env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    phased = _PHASED.match(spec)
    if phased is not None:
        phase = phased["phase"] or "compute"
        if phased["ms"] is not None:
            return Fault("slow", 0, int(phased["rank"]), phase, ms=int(phased["ms"]))
        return Fault("hang", int(phased["step"]), int(phased["hang"]), phase)
    m = _SPEC.match(spec)
    if m is None:
        raise UserError(
            f"DISTNN_FAULT={spec!r} is not KIND@step:N,rank:R with KIND raise, crash, kill or nan, "
            "nor kill@upload:N, slow@rank:R,ms:M[,phase:data|compute] or "
            "hang@step:N,rank:R[,phase:data|compute]"
        )
    if m.group(4):
        return Fault("kill", int(m.group(4)), 0, "upload")
    return Fault(m.group(1), int(m.group(2)), int(m.group(3)))
