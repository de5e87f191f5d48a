"""Elastic membership through launch/multi_node.sh (NNODES=MIN:MAX, c10d rendezvous): two
"nodes" of one process each on this host. One is SIGKILLed, the other goes on alone from the
latest checkpoint; the lost node comes back and the group grows to 2 again at the restart its
arrival causes. The whole run ends with the uninterrupted run's losses and weights."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from distnn.train import train
from tests.conftest import FAST, ROOT, assert_same_params, final_weights
from tests.test_fault_tolerance import step_losses, worker_pids

# tutorial_cnn (no BatchNorm, no dropout) with a fixed global batch: 2 processes and 1 follow
# the same curve (tests/test_resume_world.py), so the reference can run here on one.
STEPS = 16
COMMON = [*FAST, "model.name=tutorial_cnn", "train.global_batch=48", f"train.max_steps={STEPS}",
          "train.log_every=1", "data.synthetic_train=960", "data.synthetic_val=96",
          "data.image_size=16", "optim.lr=0.02", "ckpt.every_steps=4", "ckpt.keep=20",
          "ckpt.epoch_end=false", "precision=fp32",
          # a survivor's collective with a peer that hangs instead of dying fails this fast
          "dist.timeout_s=30"]  # fmt: skip
# last_call: how long a round waits for more nodes once MIN are there; both nodes start
# together, so 10 s covers their start-up skew on a loaded 2-core machine (a round with every
# node completes at once). A SIGKILLed node is declared dead after 3 missed 1-s heartbeats.
RDZV_CONF = "join_timeout=60,last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3"
SAME_BATCHES = "the same global batches of 48 follow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One launch/multi_node.sh (its torchrun agent: the script execs it) and its log file."""

    def __init__(self, log: Path, env: dict[str, str], *args: str) -> None:
        self.log = log
        with open(log, "a") as out:
            self.proc = subprocess.Popen(
                ["bash", str(ROOT / "launch" / "multi_node.sh"), *args], cwd=ROOT, env=env,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the agent and its workers at once, as a lost node. torchrun starts workers
        in sessions of their own, so they go by pid, not through the agent's process group."""
        for pid in [*worker_pids(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def wait_until(what: str, ok: Callable[[], bool], alive: list[Node], timeout: float) -> float:
    """Seconds until ok() holds; fails naming `what` (with the logs' ends) if a node in
    `alive` exits first or the time runs out."""
    start = time.monotonic()
    while not ok():
        for node in alive:
            if node.proc.poll() is not None:
                pytest.fail(f"{node.log.name} exited before {what}:\n{node.text()[-3000:]}")
        if time.monotonic() - start > timeout:
            logs = "\n".join(f"--- {n.log.name}\n{n.text()[-2000:]}" for n in alive)
            pytest.fail(f"no {what} in {timeout} s:\n{logs}")
        time.sleep(0.05)
    return time.monotonic() - start


# 2-3 minutes on 2 busy cores: 8 process starts (3 agents, 5 workers) and 3 rendezvous.
@pytest.mark.timeout(420)
def test_node_lost_then_back_shrinks_and_grows_the_group(tmp_path, make_cfg):
    reference = make_cfg("run.name=uninterrupted", *COMMON)
    train(reference)

    run = tmp_path / "runs" / "elastic"
    args = [f"run.dir={run.parent}", f"run.name={run.name}", *COMMON]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "NNODES": "1:2",
           "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RDZV_ID": "elastic-test"}  # fmt: skip
    # Node a hosts the c10d store, as the MASTER_ADDR node does on a real cluster (here both
    # nodes have that address, so it is said explicitly). The host must stay: when a was the
    # one killed, b's agent lost the store and exited with RendezvousConnectionError.
    a = Node(tmp_path / "a.log", {**env, "RDZV_CONF": f"{RDZV_CONF},is_host=true"}, *args)
    b_env = {**env, "RDZV_CONF": f"{RDZV_CONF},is_host=false"}
    b = Node(tmp_path / "b.log", b_env, *args)
    nodes = [a, b]
    try:
        # 1. Both train; once a checkpoint exists node b is lost.
        ckpt = run / "checkpoints" / "step_00000004.pt"
        first = wait_until("step 4 checkpoint", ckpt.exists, [a, b], timeout=120)
        assert "strategy: ddp over gloo, 2 processes" in a.text() + b.text()
        b.kill()

        # 2. a's worker fails on its next collective; a's agent restarts it in a group of one
        # (one of MAX_RESTARTS=3, the script's default for MIN:MAX), resuming the checkpoint.
        resumed = re.compile(r"resumed at step (\d+) from .*step_0*\1\.pt")
        alone = wait_until("resume alone", lambda: resumed.search(a.text()), [a], timeout=120)
        log = a.text()
        assert "strategy: single process" in log
        assert int(resumed.search(log)[1]) >= 4
        assert f"written by 2 processes, this run has 1: {SAME_BATCHES}" in log

        # 3. b comes back. Its arrival makes a's agent stop its worker (SIGTERM: it saves a
        # checkpoint and exits 75) and form a group of 2 in a new round ("membership change";
        # no restart is used up). a's worker is paused meanwhile so that its run cannot end
        # before b has started, however fast the machine.
        seen = len(log)
        paused = worker_pids(a.proc.pid)
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        b2 = Node(tmp_path / "b2.log", b_env, *args)
        nodes.append(b2)
        try:
            stopping = lambda: "closing signal SIGTERM" in a.text()[seen:]  # noqa: E731
            join = wait_until("membership change", stopping, [a, b2], timeout=120)
        finally:
            for pid in paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        ended = lambda: None not in (a.proc.poll(), b2.proc.poll())  # noqa: E731
        rest = wait_until("a and b2 to finish", ended, [], timeout=150)
        assert a.proc.returncode == 0, a.text()[-3000:]
        assert b2.proc.returncode == 0, b2.text()[-3000:]
        stopped = int(re.search(r"preempted at step (\d+): checkpoint saved", a.text())[1])
        grown = a.text()[seen:] + b2.text()  # rank 0 of the new group may be either
        assert "strategy: ddp over gloo, 2 processes" in grown
        assert f"resumed at step {stopped} from" in grown
        assert f"written by 1 processes, this run has 2: {SAME_BATCHES}" in grown
        print(
            f"\nstart to step 4 on 2 nodes {first:.1f} s, kill to resumed on 1 {alone:.1f} s, "
            f"b back to a's SIGTERM {join:.1f} s, then to the end on 2 {rest:.1f} s"
        )
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.kill()

    # 4. One run: every step logged once, on the uninterrupted curve, with its final weights.
    assert (run / "summary.json").read_text().count('"world_size": 2') == 1
    got, want = step_losses(run), step_losses(reference.run_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    assert_same_params(final_weights(run), final_weights(reference.run_dir), 1e-5, atol=1e-6)


def test_nnodes_min_max_is_checked_and_makes_restarts_elastic(tmp_path):
    # PYTHON stands in for the interpreter: it prints what torchrun would have been given.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "share=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE $*"\n')
    fake.chmod(0o755)

    def launch(**env: str) -> subprocess.CompletedProcess:
        full = {**os.environ, "PYTHON": str(fake), "MASTER_ADDR": "node1", **env}
        return subprocess.run(["bash", str(ROOT / "launch" / "multi_node.sh"), "x=1"], env=full,
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    out = launch(NNODES="2:4").stdout
    assert "share=1 -m torch.distributed.run --nnodes=2:4 --rdzv_backend=c10d" in out
    assert "--max-restarts=3 -m distnn.train x=1" in out
    assert "--max-restarts=0 " in launch(NNODES="4").stdout
    assert "--max-restarts=1 " in launch(NNODES="2:4", MAX_RESTARTS="1").stdout
    assert (
        "--rdzv_conf=last_call_timeout=5 "
        in launch(NNODES="4", RDZV_CONF="last_call_timeout=5").stdout
    )
    for bad in ("0", "4:2", "2:", "two", "1:2:3"):
        r = launch(NNODES=bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (bad, r.stderr)
        assert f"NNODES={bad} is not a node count N or MIN:MAX" in r.stderr
    r = launch(NNODES="2:4", RDZV_BACKEND="static", NODE_RANK="0")
    assert r.returncode == 2 and "needs RDZV_BACKEND=c10d" in r.stderr
