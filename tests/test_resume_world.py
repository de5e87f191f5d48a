"""A run killed at one world size resumes at another and follows the uninterrupted run's
curve: the global batch is kept (train.global_batch), the same global batches follow
(data/order.py), and the full model and optimizer state loads on any number of ranks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, assert_same_params, final_weights, run_cli, shared_run
from tests.test_fault_tolerance import step_losses, wait_for, worker_pids

# tutorial_cnn (no BatchNorm, no dropout): the math is the same however the batch is split.
# 960 samples / 48 = 20 steps an epoch: the kill at step 4 and the end at 8 are mid-epoch.
COMMON = [*FAST, "train.global_batch=48", "train.max_steps=8", "train.log_every=1",
          "data.synthetic_train=960", "data.synthetic_val=96", "optim.lr=0.02",
          "ckpt.every_steps=4", "ckpt.keep=10", "ckpt.epoch_end=false", "dist.timeout_s=60",
          "precision=fp32"]  # fmt: skip


def args(nproc: int, run_dir: Path, strategy: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "distnn.train", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", *COMMON,
            f"strategy.name={strategy}"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """DDP on 2 ranks, uninterrupted: what either strategy, killed and resumed at another
    world size, must follow (FSDP computes what DDP does: tests/test_fsdp.py)."""
    return shared_run(tmp_path_factory, "resume_world_ddp", lambda path: args(2, path, "ddp"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_killed_on_two_ranks_resumes_exactly_on_one_and_on_three(tmp_path, strategy, reference):

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args(2, killed, strategy)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    # DDP writes one file; FSDP a DCP directory (renamed into place whole).
    step4 = "step_00000004" + (".pt" if strategy == "ddp" else "")
    wait_for(killed / "checkpoints" / step4, proc)
    for pid in [*worker_pids(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not (killed / "summary.json").exists()

    for nproc in (1, 3):
        run_dir = tmp_path / f"on_{nproc}"
        shutil.copytree(killed, run_dir)
        r = run_cli(*args(nproc, run_dir, strategy), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"this run has {nproc}: the same global batches of 48 follow" in r.stdout
        got, want = step_losses(run_dir), step_losses(reference)
        assert sorted(got) == sorted(want) == list(range(1, 9))
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (nproc, step)
        assert_same_params(final_weights(run_dir), final_weights(reference), 1e-5, atol=1e-6)
