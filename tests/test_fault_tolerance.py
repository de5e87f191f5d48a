"""Runs die and come back: kills, crashes with elastic restarts, preemption signals, bad files.

Each multi-process test compares against one uninterrupted 2-process run of the same config.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distnn import checkpoint, models
from distnn.errors import UserError
from distnn.monitor import read_metrics
from distnn.predict import main as predict
from distnn.preempt import PREEMPTED_EXIT_CODE, requeue_command
from distnn.train import train
from tests.conftest import FAST, ROOT, final_weights, run_cli, shared_run

# alexnet_cifar has dropout: exact continuation needs every rank's RNG state restored. The
# full recipe is on (RandAugment, random erasing, MixUp/CutMix, an EMA of the weights): each
# must continue exactly too. 16 steps an epoch (512 samples, global batch 32), at 16 px.
COMMON = [*FAST, "model.name=alexnet_cifar", "train.max_steps=24", "train.batch_size=16",
          "data.synthetic_train=512", "data.synthetic_val=64", "data.image_size=16",
          "train.log_every=1", "ckpt.every_steps=4", "ckpt.keep=10",
          "ckpt.epoch_end=false", "dist.timeout_s=60", "data.augment=randaugment",
          "data.random_erasing=0.25", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
          "train.label_smoothing=0.1", "train.ema_decay=0.9"]  # fmt: skip
STEPS_PER_EPOCH = 16


def torchrun_args(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra,
            "-m", "distnn.train", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
            *COMMON]  # fmt: skip


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = step_losses(run_dir), step_losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 25))  # no step lost or repeated
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    for ema in (False, True):
        a, b = final_weights(run_dir, ema), final_weights(reference, ema)
        assert a.keys() == b.keys()
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=f"{k} (ema {ema})")


def resumed_at(stdout: str) -> int:
    return int(re.search(r"resumed at step (\d+)", stdout).group(1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: once in the session, whichever worker asks first."""
    return shared_run(tmp_path_factory, "fault_tolerance", torchrun_args)


def start_torchrun(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *torchrun_args(run_dir, *extra)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def worker_pids(agent_pid: int) -> list[int]:
    """The training processes torchrun started (its children)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == agent_pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.timeout(300)
def test_sigkill_mid_epoch_then_resume_follows_the_same_curve(tmp_path, reference):
    run_dir = tmp_path / "killed"
    proc = start_torchrun(run_dir)
    wait_for(run_dir / "checkpoints" / "step_00000008.pt", proc)
    # Every process at once, as a failed node. torchrun starts its workers in sessions of
    # their own, so they are killed by pid, not through the agent's process group.
    for pid in [*worker_pids(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not (run_dir / "summary.json").exists()
    r = run_cli(*torchrun_args(run_dir), timeout=240)  # same command: ckpt.resume=auto
    assert r.returncode == 0, r.stderr[-3000:]
    assert resumed_at(r.stdout) in (8, 12)  # mid-epoch: the loader resumes inside the epoch
    assert resumed_at(r.stdout) % STEPS_PER_EPOCH
    assert_same_run(run_dir, reference)


@pytest.mark.timeout(300)
def test_elastic_restart_after_a_crash_completes_the_run(tmp_path, reference):
    run_dir = tmp_path / "elastic"
    r = run_cli(*torchrun_args(run_dir, "--max-restarts=1"), timeout=240,
                env={"DISTNN_FAULT": "crash@step:10,rank:1"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at step 8" in r.stdout  # the crash at 10 lost steps 9-10, redone
    assert_same_run(run_dir, reference)


@pytest.mark.timeout(300)
def test_sigusr1_checkpoints_requeues_and_resumes_exactly(tmp_path, reference):
    # Only the nodelist-free `scontrol requeue` is faked: it records the command it was given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run_dir = tmp_path / "preempted"
    proc = start_torchrun(run_dir, env=env)
    wait_for(run_dir / "checkpoints" / "step_00000004.pt", proc)
    # One rank only gets the signal; the all-reduced flag stops both at the same step.
    rank1 = sorted(worker_pids(proc.pid))[-1]
    os.kill(rank1, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in err or f"exitcode: {PREEMPTED_EXIT_CODE}" in err
    stopped = int(out.split("preempted at step ")[1].split(":")[0])
    assert 4 < stopped < 24
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:08d}.pt"
    assert calls.read_text().split() == ["requeue", "4242"]
    r = run_cli(*torchrun_args(run_dir), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(run_dir, reference)


def test_requeue_command():
    assert requeue_command({"SLURM_JOB_ID": "7"}) == ["scontrol", "requeue", "7"]
    assert requeue_command({"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3",
                            "SLURM_JOB_ID": "9"}) == ["scontrol", "requeue", "7_3"]  # fmt: skip
    assert requeue_command({"SLURM_JOB_ID": "7", "SUBMITIT_EXECUTOR": "slurm"}) is None
    assert requeue_command({}) is None


SHORT = ["train.max_steps=6", "train.batch_size=64", "data.synthetic_train=512",
         "ckpt.every_steps=2", "ckpt.epoch_end=false", "ckpt.keep=5"]  # fmt: skip


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(make_cfg, capsys):
    cfg = make_cfg("run.name=trunc", *SHORT, "train.log_every=1")
    train(cfg)
    newest = cfg.run_dir / "checkpoints" / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short, as by a full disk
    with pytest.warns(UserWarning, match="skipping checkpoint.*step_00000006.pt"):
        summary = train(cfg)
    assert summary["steps"] == 6
    assert "resumed at step 4 from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(cfg.run_dir) if "loss" in r][-2:] == [5, 6]
    # The cut file was replaced by the resumed run's own step 6, which loads.
    assert checkpoint.load_file(newest)["position"]["step"] == 6


def test_starting_over_replaces_the_old_run_s_checkpoints(make_cfg):
    train(make_cfg("run.name=over", *SHORT, "train.log_every=1"))
    cfg = make_cfg("run.name=over", *SHORT[1:], "train.max_steps=4", "ckpt.resume=never",
                   "train.seed=5", "train.log_every=1")  # fmt: skip
    train(cfg)
    ckpts = cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == [
        "step_00000002.pt", "step_00000004.pt",
    ]  # fmt: skip
    assert (ckpts / "latest").read_text().strip() == "step_00000004.pt"
    assert checkpoint.load_file(cfg.run_dir)["config"]["train"]["seed"] == 5
    assert [r["step"] for r in read_metrics(cfg.run_dir) if "loss" in r] == [1, 2, 3, 4]


def test_checkpoint_of_another_model_is_refused_in_one_line(make_cfg):
    train(make_cfg("run.name=mix", *SHORT))
    with pytest.raises(
        UserError, match=r"trained with model.name=tutorial_cnn, this run has lenet5"
    ):
        train(make_cfg("run.name=mix", *SHORT, "model.name=lenet5"))
    with pytest.raises(UserError, match=r"trained with optim.name=sgd, this run has adamw"):
        train(make_cfg("run.name=mix", *SHORT, "optim.name=adamw"))


def test_nonfinite_loss_raises_naming_the_step(make_cfg):
    with pytest.raises(UserError, match=r"non-finite training loss by step 2"):
        train(make_cfg("run.name=nan", *SHORT, "train.log_every=2", "optim.lr=1e30"))


def test_nonfinite_skip_drops_the_step_and_counts_it(make_cfg, monkeypatch):
    monkeypatch.setenv("DISTNN_FAULT", "nan@step:3,rank:0")
    cfg = make_cfg("run.name=skip", *SHORT, "train.nonfinite=skip", "train.log_every=1")
    summary = train(cfg)
    losses = [r["loss"] for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert summary["steps"] == 6 and len(losses) == 6
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert checkpoint.load_file(cfg.run_dir)["meters"]["skipped"] == 1
    monkeypatch.setenv("DISTNN_FAULT", "nan@step:1,rank:0")
    with pytest.raises(UserError, match=r"at step 1: 1 steps skipped, more than"):
        train(make_cfg("run.name=skip2", *SHORT, "train.nonfinite=skip", "train.max_skips=0"))


def test_export_loads_strict_and_predicts(make_cfg, tmp_path):
    from PIL import Image

    cfg = make_cfg("run.name=exp", *SHORT, "model.name=resnet18", "data.image_size=32",
                   "train.batch_size=8", "data.synthetic_val=16")  # fmt: skip
    train(cfg)
    out = tmp_path / "m.safetensors"
    r = run_cli("-m", "distnn.checkpoint", "export", str(cfg.run_dir), str(out))
    assert r.returncode == 0, r.stderr
    plain = load_file(out)  # tensors and nothing else
    model = models.build("resnet18", 10, 32)
    model.load_state_dict(plain, strict=True)
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(img)
    by_export = predict(["--checkpoint", str(out), str(img)])
    by_run = predict(["--checkpoint", str(cfg.run_dir), str(img)])
    assert by_export == by_run
