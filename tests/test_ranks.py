"""Where each rank's time goes (monitor/ranks.py) and the faults that act in a phase (slow@, hang@).
Issue 31 builds on these: the gather of every rank's phases, stragglers and the watchdog."""

from __future__ import annotations

import time

import pytest

from distnn import faults
from distnn.errors import UserError
from distnn.monitor import ranks
from tests.conftest import run_cli


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
    clock.now += 5.0  # set-up: stall
    for step in (1, 2):
        phases.enter("data", step)
        clock.now += 0.25
        phases.enter("compute", step)
        clock.now += 1.0
        phases.enter("optimizer", step)
        clock.now += 0.5
    assert phases.read() == {"data": 0.5, "compute": 2.0, "optimizer": 1.0, "stall": 5.0}
    clock.now += 0.125  # still in the optimizer phase
    assert phases.read() == {"data": 0.0, "compute": 0.0, "optimizer": 0.125, "stall": 0.0}
    assert (phases.current, phases.step) == ("optimizer", 2)


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
    phases = ranks.Phases(rank=1, fault=faults.from_env({"DISTNN_FAULT": "slow@rank:1,ms:200"}))
    for step in (1, 2):
        phases.enter("data", step)
        phases.enter("compute", step)
    ranks.Phases(rank=0, fault=phases.fault).enter("compute", 1)
    assert slept == [0.2, 0.2]


@pytest.mark.timeout(120)
def test_a_hung_rank_ends_the_job_at_the_collective_timeout(tmp_path):
    """Until the watchdog names it (issue 31), gloo's timeout ends the job: never a hang."""
    start = time.monotonic()
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "distnn.train", f"run.dir={tmp_path}", "run.name=hung", "data.workers=0",
                "log.progress=off", "log.wandb.mode=disabled", "data.synthetic_train=128",
                "data.synthetic_val=32", "train.batch_size=8", "train.max_steps=10",
                "dist.timeout_s=10", env={"DISTNN_FAULT": "hang@step:3,rank:1"},
                timeout=100)  # fmt: skip
    assert r.returncode != 0
    assert time.monotonic() - start < 90
