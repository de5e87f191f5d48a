"""Where each rank's time goes (monitor/ranks.py) and the faults that act in a phase (slow@, hang@).
Issue 31 builds on these: the gather of every rank's phases, stragglers and the watchdog."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as td

from distnn import config, faults
from distnn.errors import UserError
from distnn.monitor import ranks, read_metrics, watchdog
from tests.conftest import FAST, ROOT, final_weights, run_cli


class Clock:
    """A perf_counter the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_sum_each_interval_and_count_the_running_phase_up_to_now(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ranks.time, "perf_counter", clock)
    phases = ranks.Phases()
    heard = []
    phases.listeners.append(lambda phase, step: heard.append((phase, step)))
    clock.now += 5.0  # set-up: stall
    for step in (1, 2):
        phases.enter("data", step)
        clock.now += 0.25
        phases.enter("compute", step)
        clock.now += 1.0
        phases.enter("comm", step)
        clock.now += 0.75
        phases.enter("optimizer", step)
        clock.now += 0.5
    assert phases.read() == {"data": 0.5, "compute": 2.0, "comm": 1.5, "optimizer": 1.0,
                             "stall": 5.0}  # fmt: skip
    clock.now += 0.125  # still in the optimizer phase
    assert phases.read() == {"data": 0.0, "compute": 0.0, "comm": 0.0, "optimizer": 0.125,
                             "stall": 0.0}  # fmt: skip
    assert (phases.current, phases.step, phases.moves) == ("optimizer", 2, 8)
    assert heard[:4] == [("data", 1), ("compute", 1), ("comm", 1), ("optimizer", 1)]


def rows_of(per_rank: list[dict[str, float]], steps: int = 10) -> list[list[float]]:
    """Gathered rows (ranks.COLUMNS) of ranks that each ran `steps` steps in 1 s."""
    base = {"loss_sum": 2.0, "loss_count": 10, "images": 320, "steps": steps, "seconds": 1.0}
    full = [{**base, **dict.fromkeys(ranks.PHASES, 0.0), **r} for r in per_rank]
    return [[float(row[c]) for c in ranks.COLUMNS] for row in full]


def test_the_job_figures_come_from_every_rank():
    rows = rows_of([{"compute": 0.4, "comm": 0.5, "data": 0.1, "images": 320},
                    {"compute": 0.9, "data": 0.1, "images": 320, "loss_sum": 4.0},
                    {"compute": 0.4, "comm": 0.4, "data": 0.2, "images": 160}])  # fmt: skip
    job = ranks.summarize(rows)
    assert job.loss == pytest.approx(8.0 / 30)  # every rank's micro-batches, not rank 0's
    r = job.record
    assert r["images_per_sec"] == pytest.approx(800)  # each rank's own rate, summed
    assert r["images_per_sec_per_device"] == pytest.approx(800 / 3)
    assert r["slowest_rank"] == 1
    assert (r["compute_s_max"], r["compute_s_median"], r["compute_s_min"]) == pytest.approx(
        (0.09, 0.04, 0.04)
    )  # per step
    assert (r["comm_s_max"], r["comm_s_min"]) == pytest.approx((0.05, 0.0))
    assert r["data_wait"] == pytest.approx(0.2)  # the worst-fed rank's share


def test_a_straggler_is_named_once_per_episode_with_its_slow_phase():
    where = [ranks.Where(r, f"node{r:03d}", r % 2, str(r % 2), 100 + r) for r in range(4)]
    watch = ranks.Stragglers(ratio=1.2, intervals=2, where=where)
    even = [{"compute": 0.5, "data": 0.1}] * 4
    slow_data = [{"compute": 0.5, "data": 0.1}] * 3 + [{"compute": 0.5, "data": 4.1}]
    lines = [watch.update(ranks.summarize(rows_of(rows)))
             for rows in (slow_data, slow_data, slow_data, even, slow_data, slow_data)]  # fmt: skip
    assert [len(batch) for batch in lines] == [0, 1, 0, 0, 0, 1]  # confirmed, then once again
    assert lines[1] == [
        "straggler: rank 3 on node003 (local rank 1, GPU 1): data wait 0.410 s/step vs median "
        "0.010 s of the other ranks (2 log intervals in a row; metrics field slowest_rank)"
    ]
    # A rank that only waits longer (comm) is not slow: its peers are.
    waiting = [{"compute": 0.5, "comm": 3.0}] + [{"compute": 0.5}] * 3
    assert not any(watch.update(ranks.summarize(rows_of(waiting))) for _ in range(3))
    # Twice as slow at sub-millisecond steps, but under a millisecond lost per step: jitter.
    jitter = [{"compute": 0.004}] * 3 + [{"compute": 0.009}]  # per 10 steps
    assert not any(watch.update(ranks.summarize(rows_of(jitter))) for _ in range(3))
    longer = ranks.summarize(rows_of(jitter, steps=4))  # 1.25 ms lost per step: a straggler
    assert [len(watch.update(longer)) for _ in range(2)] == [0, 1]


@pytest.mark.parametrize(
    "override, world, message",
    [("prof.steps=5:3", 1, r"prof.steps='5:3' is not START:END with 1 <= START <= END"),
     ("prof.steps=20", 1, r"prof.steps='20' is not START:END"),
     ("prof.ranks=0,3", 2, r"prof.ranks=\[0, 3\] names ranks \[3\] of a job of 2 processes; "
                           r"valid: 0..1"),
     ("monitor.straggler_ratio=0.9", 1, r"'monitor.straggler_ratio' must be > 1, got 0.9"),
     ("monitor.straggler_intervals=0", 1, r"'monitor.straggler_intervals' must be >= 1"),
     ("dist.hang_s=-1", 1, r"'dist.hang_s' must be >= 0 \(0: off\), got -1.0")],
)  # fmt: skip
def test_bad_monitor_settings_are_one_line_naming_the_valid_values(override, world, message):
    with pytest.raises(UserError, match=message):
        config.for_world(config.load(None, [override]), world)


def test_the_watchdog_waits_three_quarters_of_the_collective_timeout_by_default():
    assert config.load(None, ["dist.timeout_s=30"]).dist.hang_after_s == 22.5
    assert config.load(None, ["dist.hang_s=5"]).dist.hang_after_s == 5
    assert config.load(None, ["dist.hang_s=0"]).dist.hang_after_s == 0  # off


@pytest.mark.parametrize(
    "spec, kind, rank, phase, step, ms",
    [("slow@rank:1,ms:200", "slow", 1, "compute", 0, 200),
     ("slow@rank:2,ms:5,phase:data", "slow", 2, "data", 0, 5),
     ("hang@step:20,rank:1", "hang", 1, "compute", 20, 0),
     ("hang@step:3,rank:0,phase:data", "hang", 0, "data", 3, 0)],
)  # fmt: skip
def test_phase_faults_parse(spec, kind, rank, phase, step, ms):
    f = faults.from_env({"DISTNN_FAULT": spec})
    assert (f.kind, f.rank, f.phase, f.step, f.ms) == (kind, rank, phase, step, ms)
    assert faults.from_env({"DISTNN_FAULT": spec, "TORCHELASTIC_RESTART_COUNT": "1"}) is None


def test_a_bad_phase_fault_is_one_line_naming_the_forms():
    with pytest.raises(UserError, match=r"slow@rank:R,ms:M\[,phase:data\|compute\]"):
        faults.from_env({"DISTNN_FAULT": "slow@rank:1,ms:200,phase:optimizer"})


def test_slow_sleeps_in_its_phase_on_its_rank_only(monkeypatch):
    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    fault = faults.from_env({"DISTNN_FAULT": "slow@rank:1,ms:200"})
    for step in (1, 2):
        fault.enter("data", step, rank=1)
        fault.enter("compute", step, rank=1)
    fault.enter("compute", 1, rank=0)
    assert slept == [0.2, 0.2]


def train_ranks(tmp_path: Path, name: str, nproc: int, *extra: str, env: dict | None = None,
                timeout: float = 150):  # fmt: skip
    return run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "distnn.train", f"run.dir={tmp_path}", f"run.name={name}", *FAST,
                   "data.synthetic_train=4096", "data.synthetic_val=32", "train.batch_size=16",
                   "optim.lr=0.01", *extra, env=env, timeout=timeout)  # fmt: skip


def intervals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc", [2, 3])
def test_a_slow_rank_is_the_slowest_and_the_others_wait_in_comm(tmp_path, nproc):
    # Ratio 2 over 3 intervals: rank 1's 200 ms is 5x its peers' step; beside another test on
    # these 2 cores, contention alone once made a plain rank 1.2x slower for 2 intervals.
    steps = ["train.max_steps=24", "train.log_every=4", "monitor.straggler_ratio=2",
             "monitor.straggler_intervals=3"]  # fmt: skip
    plain = train_ranks(tmp_path, "plain", nproc, *steps)
    slow = train_ranks(tmp_path, "slow", nproc, *steps, env={"DISTNN_FAULT": "slow@rank:1,ms:200"})
    assert plain.returncode == 0 and slow.returncode == 0, slow.stderr[-3000:]
    base, slowed = intervals(tmp_path / "plain"), intervals(tmp_path / "slow")
    assert [r["slowest_rank"] for r in slowed[1:]] == [1] * (len(slowed) - 1)
    lines = [line for line in slow.stdout.splitlines() if line.startswith("straggler:")]
    assert len(lines) == 1 and lines[0].startswith("straggler: rank 1 on ")
    assert "forward/backward 0.2" in lines[0]  # its phase, and its 200 ms
    if nproc == 2:  # three ranks on this machine's 2 cores take turns: real stragglers
        assert not any(line.startswith("straggler:") for line in plain.stdout.splitlines())
    # The others' own work is as before; the 200 ms they lose shows as waiting for rank 1.
    if nproc == 2:
        # The least contended interval of each run: beside another test on this machine's 2
        # cores, the plain run's 2 busy ranks compete for the cores (medians 51 vs 39 ms seen)
        # where the slowed run's rank 0 computes while rank 1 sleeps.
        own = min(r["compute_s_min"] for r in slowed[1:])
        assert own == pytest.approx(min(r["compute_s_min"] for r in base[1:]), rel=0.2)
    else:  # unslowed, 3 ranks share 2 cores and each computes slower than when one sleeps
        own = statistics.median(r["compute_s_median"] for r in slowed[1:])
        assert own <= 1.2 * statistics.median(r["compute_s_median"] for r in base[1:])
    waited = "comm_s_max" if nproc == 2 else "comm_s_median"
    assert statistics.median(r[waited] for r in slowed[1:]) > 0.15
    assert statistics.median(r["comm_s_max"] for r in base[1:]) < 0.05
    assert statistics.median(r["compute_s_max"] for r in slowed[1:]) > 0.2


class Peer(threading.Thread):
    """Another rank's heartbeats, written into a real TCPStore as its watchdog writes them."""

    def __init__(self, store: td.Store, rank: int, phase: str, step: int, live: bool) -> None:
        super().__init__(daemon=True)
        self.store, self.rank, self.beat = store, rank, {"beat": 1, "phase": phase, "step": step}
        self.live, self.done = live, threading.Event()
        store.set(f"distnn/heartbeat/{rank}", json.dumps(self.beat))
        self.start()

    def run(self) -> None:
        while self.live and not self.done.wait(0.02):
            self.beat["beat"] += 1
            self.store.set(f"distnn/heartbeat/{self.rank}", json.dumps(self.beat))


@pytest.mark.parametrize(
    "peers, verdict",
    [([("comm", 5, True), ("data", 5, True)],
      "rank 2 (host node2, pid 102) stuck in data wait (data) at step 5; ranks 0,1 waiting in "
      "gradient communication (comm) at step 5"),
     ([("comm", 5, True), ("compute", 5, False)],
      "rank 2 (host node2, pid 102) stopped responding (no heartbeat; last seen in "
      "forward/backward (compute) at step 5); ranks 0,1 waiting in gradient communication "
      "(comm) at step 5"),
     ([("comm", 5, True), ("comm", 5, True)],
      "every rank is in gradient communication (comm) at step 5: the collective itself is not "
      "completing")],
)  # fmt: skip
def test_the_verdict_names_the_rank_behind_or_the_one_whose_heartbeat_stopped(
    tmp_path, peers, verdict
):
    store = td.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mine = ranks.Ranks(config.MonitorConfig(), torch.device("cpu"), None)
    mine.where = [ranks.Where(r, f"node{r}", 0, "cpu", 100 + r) for r in range(3)]
    mine.me = mine.where[0]
    mine.phases.enter("comm", 5)
    others = [Peer(store, r, *peer) for r, peer in enumerate(peers, start=1)]
    dog = watchdog.Watchdog(mine, tmp_path, hang_s=0.2, stopping=lambda: False)
    dog.store = store
    try:
        time.sleep(0.1)  # its own first beats
        assert dog.verdict() == verdict
    finally:
        dog.close()
        for peer in others:
            peer.done.set()


class Job:
    """A torchrun job whose stderr lines are timestamped as they arrive."""

    def __init__(self, tmp_path: Path, *extra: str, env: dict | None = None) -> None:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "distnn.train", f"run.dir={tmp_path}", "run.name=hang", *FAST,
             "data.synthetic_train=4096", "data.synthetic_val=32", "train.batch_size=16",
             "optim.lr=0.01", "dist.timeout_s=30", *extra],
            env={**os.environ, "PYTHONPATH": path, **(env or {})}, cwd=ROOT, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float) -> tuple[int, float]:
        """The exit code and when the job ended."""
        workers = self.workers()
        try:
            code = self.proc.wait(timeout)
        finally:
            for pid in [*workers.values(), self.proc.pid]:  # a stopped rank, on a failure
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        ended = time.monotonic()
        self.reader.join(10)
        return code, ended

    def first_error(self) -> tuple[float, str]:
        """The first line that reports a failure: ours, or the transport's timeout."""
        errors = re.compile(r"watchdog|Timed out|Error|Traceback|error:")
        return next((t, line) for t, line in self.lines if errors.search(line))

    def workers(self) -> dict[int, int]:
        """RANK -> pid of the job's training processes."""
        out = {}
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, ValueError):
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (proc / "environ").read_text().split("\0")
                ranks = [v.split("=", 1)[1] for v in env if v.startswith("RANK=")]
                if parent == self.proc.pid and ranks:
                    out[int(ranks[0])] = int(proc.name)
        return out


def hang_at(line: str) -> float:
    """When the hang began, from the watchdog's line: its time less the idle it reports."""
    return float(re.search(r"no progress for (\d+) s", line)[1])


@pytest.mark.timeout(150)
def test_a_hung_rank_is_named_with_its_host_and_phase_before_the_timeout_ends_the_job(tmp_path):
    job = Job(tmp_path, "train.max_steps=400", env={"DISTNN_FAULT": "hang@step:20,rank:1"})
    code, ended = job.wait(timeout=130)
    assert code != 0
    at, first = job.first_error()
    assert "distnn watchdog" in first, "\n".join(line for _, line in job.lines[-30:])
    host = socket.gethostname()
    assert f"rank 1 (host {host}, pid " in first
    assert "stuck in forward/backward (compute) at step 20" in first
    assert "rank 0 waiting in gradient communication (comm) at step 20" in first
    began = at - hang_at(first)
    assert ended - began < 30 + 20
    hang = tmp_path / "hang" / "hang"
    stuck = (hang / "rank_1.txt").read_text()
    assert "phase: forward/backward (compute) at step 20" in stuck
    assert re.search(r"line \d+ in forward_backward", stuck)  # the hanging phase's function
    waiting = (hang / "rank_0.txt").read_text()
    assert "phase: gradient communication (comm) at step 20" in waiting
    assert "last collective entered: gloo:all_reduce" in waiting
    assert re.search(r"line \d+ in backward", waiting)  # DDP's all-reduce, in backward


@pytest.mark.timeout(200)
def test_a_stopped_rank_is_found_by_its_missing_heartbeat(tmp_path):
    """SIGSTOP: the rank cooperates in nothing; the others' watchdogs name it from the store.
    torchrun then waits its fixed 30 s for the stopped process (its failure path ignores
    --shutdown_timeout) before the SIGKILL."""
    job = Job(tmp_path, "train.max_steps=100000", "train.log_every=5")
    metrics = tmp_path / "hang" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.exists() and metrics.read_text().count("loss") >= 2):
        assert time.monotonic() < deadline and job.proc.poll() is None, job.lines[-20:]
        time.sleep(0.5)
    pid = job.workers()[1]
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    code, ended = job.wait(timeout=150)
    assert code != 0
    _, first = job.first_error()
    assert "distnn watchdog, rank 0" in first, "\n".join(line for _, line in job.lines[-30:])
    host = socket.gethostname()
    assert re.search(
        rf"rank 1 \(host {host}, pid {pid}\) stopped responding \(no heartbeat; "
        r"last seen in [a-z/ ]+ \((data|compute|comm|optimizer)\) at step \d+",
        first,
    )
    assert ended - stopped < 30 + 20 + 30
    waiting = (tmp_path / "hang" / "hang" / "rank_0.txt").read_text()
    assert "last collective entered: gloo:" in waiting
    assert not (tmp_path / "hang" / "hang" / "rank_1.txt").exists()  # it could not write


def trace_phases(path: Path) -> dict[str, int]:
    """Each distnn.<phase> label in a trace, with how many aten ops ran inside its spans."""
    events = [e for e in json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
              if e.get("ph") == "X"]  # fmt: skip
    labels = [e for e in events if e["name"].startswith("distnn.")]
    aten = [e for e in events if e["name"].startswith("aten::")]
    inside: dict[str, int] = {}
    for label in labels:
        end = label["ts"] + label["dur"]
        ops = sum(a["tid"] == label["tid"] and label["ts"] <= a["ts"] < end for a in aten)
        inside[label["name"]] = inside.get(label["name"], 0) + ops
    return inside


@pytest.mark.timeout(200)
def test_a_profile_window_traces_each_rank_by_phase_and_changes_no_weight(tmp_path):
    steps = ["data.synthetic_train=256", "train.max_steps=10", "train.log_every=5"]
    window = train_ranks(tmp_path, "window", 2, *steps, "prof.steps=3:7")
    plain = train_ranks(tmp_path, "plain", 2, *steps)
    assert window.returncode == 0 and plain.returncode == 0, window.stderr[-3000:]
    profile = tmp_path / "window" / "profile"
    traces = sorted(profile.glob("*.pt.trace.json.gz"))
    assert [t.name for t in traces] == ["rank_0.pt.trace.json.gz", "rank_1.pt.trace.json.gz"]
    for trace in traces:
        inside = trace_phases(trace)  # loads as JSON
        assert set(inside) == {f"distnn.{p}" for p in ("data", "compute", "comm", "optimizer")}
        assert all(ops >= 1 for ops in inside.values()), inside
    assert "profile of steps 3-7" in window.stdout and "aten::" in window.stdout  # the table
    assert "aten::" in (profile / "rank_1_ops.txt").read_text()
    assert not (tmp_path / "plain" / "profile").exists()
    a, b = final_weights(tmp_path / "window"), final_weights(tmp_path / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_the_overhead_benchmark_runs_every_row(tmp_path):
    """benchmarks/monitor_overhead.py, quick: its JSON's shape (its figures: make bench)."""
    r = run_cli("-m", "benchmarks.monitor_overhead", "--quick", "--repeats=1",
                f"--out={tmp_path}", timeout=280)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "monitor_overhead.json").read_text())["rows"]
    assert [(row["model"], row["world_size"]) for row in rows] == [
        ("tutorial_cnn", 1), ("linear", 1), ("tutorial_cnn", 2), ("linear", 2)]  # fmt: skip
    assert all(row["unwatched_us_per_step"]["median"] > 0 for row in rows)
    assert "| linear 8 px, batch 64 | 1 |" in (tmp_path / "monitor_overhead.md").read_text()
