"""Where a rank's time goes: the phases the loop marks, summed over each log interval.

The engine says which phase it enters, and only that (`Phases.enter`): data (waiting for the
next batch), compute (forward and backward of a micro-batch), optimizer (the step, its
communication and the log interval's own), stall (checkpoints and evaluation). A transition
costs one `perf_counter()` and an addition, never a device sync. Injected faults
(faults.py: slow@, hang@) act as the rank enters their phase, so the loop has no branch for
them.

Next (issue 31): the log interval's one all-gather of every rank's seconds, the slowest rank
and stragglers; on CUDA, events for the compute phases; the watchdog's heartbeat reads
`current` and the step.
"""

from __future__ import annotations

import time

from distnn.faults import Fault

PHASES = ("data", "compute", "optimizer", "stall")


class Phases:
    def __init__(self, rank: int = 0, fault: Fault | None = None) -> None:
        self.rank, self.fault = rank, fault
        self.current = "stall"  # set-up, until the loop asks for its first batch
        self.step = 0
        self.since = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def enter(self, phase: str, step: int) -> None:
        """From now on this rank is in `phase` of optimizer step `step` (counted from 1)."""
        now = time.perf_counter()
        self.seconds[self.current] += now - self.since
        self.current, self.step, self.since = phase, step, now
        if self.fault is not None:
            self.fault.enter(phase, step, self.rank)

    def read(self) -> dict[str, float]:
        """Seconds in each phase since the last read (the phase now running counts up to
        now); starts the next interval."""
        now = time.perf_counter()
        self.seconds[self.current] += now - self.since
        self.since = now
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return out
