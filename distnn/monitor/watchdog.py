"""A hang explained, on every rank, before the collective timeout ends the job.

A thread per rank writes a heartbeat (its beat count, phase and step) to the process group's
store (the TCPStore torchrun's rendezvous made) every second or so, and watches the rank's
phase transitions (monitor/ranks.py). When the rank has not moved for `dist.hang_s` (default
3/4 of `dist.timeout_s`), the thread:

- writes `<run dir>/hang/rank_<R>.txt`: the rank's phase, step and last collective entered
  (from torch's flight recorder), then the Python stacks of all its threads (faulthandler);
  on a node without the shared filesystem that is the node's own run directory;
- reads every rank's heartbeat twice, a few beats apart, from the store, never through a
  collective: a rank whose beat did not move is stopped (SIGSTOP, a frozen node); otherwise
  the ranks furthest behind in (step, phase) are the ones the others wait for;
- prints one line to stderr naming them, their host, pid and phase, and what the others wait
  in. Then the job ends as it would have: the collective's timeout raises on the waiting ranks.

On NCCL torch's flight recorder also dumps each rank's collectives to
`<run dir>/nccl_trace_rank_<R>` when the NCCL watchdog times out (`flight_recorder`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as td

from distnn.monitor.ranks import DESCRIBE, PHASES, WAITING, Ranks

STUCK_EXIT_CODE = 3
ORDER = {"data": 0, "compute": 1, "comm": 2, "optimizer": 3, "stall": 4}  # within a step
assert set(ORDER) == set(PHASES)


def flight_recorder(run_dir: Path, entries: int = 2000) -> None:
    """Record every collective (torch's flight recorder: gloo and NCCL) and, on NCCL, dump the
    record into the run directory when a collective times out. Before the process group forms;
    a user's own settings win."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(entries))
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(run_dir / "nccl_trace_rank_"))


def last_collective() -> str:
    """The newest collective this process entered, from the flight recorder ("" if none)."""
    from torch._C import _distributed_c10d as c10d

    # torch 2.14's recorder for every backend; before it, NCCL's only.
    dump = getattr(c10d, "_dump_fr_trace_json", None) or c10d._dump_nccl_trace_json
    try:
        entries = json.loads(dump(includeCollectives=True)).get("entries") or []
    except (RuntimeError, ValueError):
        return ""
    if not entries:
        return ""
    e = entries[-1]
    return f"{e['profiling_name']} #{e['collective_seq_id']} of group {e['process_group'][1]}"


def _store() -> td.Store | None:
    if not (td.is_initialized() and td.get_world_size() > 1):
        return None
    return td.distributed_c10d._get_default_store()


class Watchdog:
    def __init__(
        self, ranks: Ranks, run_dir: Path, hang_s: float, stopping: Callable[[], bool]
    ) -> None:
        self.ranks, self.hang_s, self.stopping = ranks, hang_s, stopping
        self.dir = run_dir / "hang"
        self.beat_s = min(1.0, hang_s / 10)
        self.store = _store()
        self.beats = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="distnn-watchdog", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        phases = self.ranks.phases
        moves, since, reported = -1, time.monotonic(), False
        while not self.stop.wait(self.beat_s):
            self._beat()
            now = time.monotonic()
            if phases.moves != moves:
                moves, since, reported = phases.moves, now, False
            elif not reported and now - since >= self.hang_s:
                reported = True  # once per episode: it reports again only after progress
                self.report(now - since)
            if reported and self.stopping():
                # Told to stop (torchrun's SIGTERM after a peer failed, a scheduler's) while
                # stuck: the loop will never reach its checkpoint, and torchrun would wait
                # 30 s before its SIGKILL.
                sys.stderr.write(f"rank {self.ranks.me.rank}: stopping while stuck: exiting\n")
                sys.stderr.flush()
                os._exit(STUCK_EXIT_CODE)

    def _key(self, rank: int) -> str:
        return f"distnn/heartbeat/{rank}"

    def _beat(self) -> None:
        self.beats += 1
        if self.store is None:
            return
        phases = self.ranks.phases
        beat = {"beat": self.beats, "phase": phases.current, "step": phases.step}
        with contextlib.suppress(RuntimeError):  # the store's host gone: the job is ending
            self.store.set(self._key(self.ranks.me.rank), json.dumps(beat))

    def _heartbeats(self) -> dict[int, dict]:
        out = {}
        for rank in range(len(self.ranks.where)):
            key = self._key(rank)
            with contextlib.suppress(RuntimeError, ValueError):
                if self.store.check([key]):  # get() would wait for a missing key
                    out[rank] = json.loads(self.store.get(key))
        return out

    def report(self, idle_s: float) -> None:
        me, phases = self.ranks.me, self.ranks.phases
        collective = last_collective()
        where = f"{DESCRIBE[phases.current]} ({phases.current}) at step {phases.step}"
        path = self.dir / f"rank_{me.rank}.txt"
        with contextlib.suppress(OSError):  # the stacks are a help; the line still goes out
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"{me}, pid {me.pid}: no progress for {idle_s:.0f} s\n")
                f.write(f"phase: {where}\nlast collective entered: {collective or 'none'}\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        line = (
            f"distnn watchdog, rank {me.rank}: no progress for {idle_s:.0f} s. {self.verdict()}."
            f" This rank: {where}, last collective {collective or 'none'}; stacks in "
            f"{self.dir}/rank_<R>.txt"
        )
        sys.stderr.write(line + "\n")  # one write: ranks sharing a stderr never interleave
        sys.stderr.flush()

    def verdict(self) -> str:
        """Which ranks the others wait for, and where each rank is."""
        phases = self.ranks.phases
        if self.store is None:
            return f"rank {self.ranks.me.rank} stuck in {DESCRIBE[phases.current]}"
        first = self._heartbeats()
        for _ in range(3):  # a live rank beats in between, this one included
            time.sleep(self.beat_s)
            self._beat()
        second = self._heartbeats()
        seen = {r: b for r, b in second.items() if first.get(r, {}).get("beat") != b["beat"]}
        stopped = [r for r in range(len(self.ranks.where)) if r not in seen]
        if stopped:
            return "; ".join(
                f"{self._who(r)} stopped responding (no heartbeat; last seen in "
                f"{self._at(second.get(r))})"
                for r in stopped
            ) + self._others(seen)
        behind = min((b["step"], ORDER[b["phase"]]) for b in seen.values())
        stuck = [r for r, b in seen.items() if (b["step"], ORDER[b["phase"]]) == behind]
        if len(stuck) == len(seen):
            return f"every rank is in {self._at(seen[0])}" + (
                ": the collective itself is not completing" if seen[0]["phase"] in WAITING else ""
            )
        rest = {r: b for r, b in seen.items() if r not in stuck}
        return "; ".join(f"{self._who(r)} stuck in {self._at(seen[r])}" for r in stuck) + (
            self._others(rest)
        )

    def _who(self, rank: int) -> str:
        w = self.ranks.where[rank]
        return f"rank {rank} (host {w.host}, pid {w.pid})"

    @staticmethod
    def _at(beat: dict | None) -> str:
        if beat is None:
            return "no phase (it never sent a heartbeat)"
        return f"{DESCRIBE[beat['phase']]} ({beat['phase']}) at step {beat['step']}"

    def _others(self, beats: dict[int, dict]) -> str:
        groups: dict[str, list[int]] = {}
        for rank, beat in sorted(beats.items()):
            groups.setdefault(self._at(beat), []).append(rank)
        return "".join(
            f"; rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))} waiting in {at}"
            for at, rs in groups.items()
        )


def start(
    ranks: Ranks, run_dir: Path, hang_s: float, stopping: Callable[[], bool]
) -> Watchdog | None:
    """The rank's watchdog; None where `hang_s` is 0 (off). `stopping`: whether the process
    has been told to stop (a preemption signal)."""
    return Watchdog(ranks, run_dir, hang_s, stopping) if hang_s > 0 else None
