"""Where a process sits in the job, from each launcher's variables."""

from __future__ import annotations

import os
import stat

import pytest

from distnn.errors import UserError
from distnn.faults import Fault, from_env
from distnn.parallel.env import Env, detect


def test_single_process_without_launcher_variables():
    assert detect({}) == Env()
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == Env()  # a batch shell


def test_torchrun_variables():
    env = detect({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                  "GROUP_RANK": "1", "MASTER_ADDR": "node07", "MASTER_PORT": "29511"})  # fmt: skip
    assert env == Env(rank=5, local_rank=1, world_size=16, local_world_size=4, node_rank=1,
                      num_nodes=4, master_addr="node07", master_port=29511,
                      launcher="torchrun")  # fmt: skip
    assert env.distributed and not env.is_main


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """Only the nodelist expansion is faked: a real cluster test lives with the launchers."""
    script = tmp_path / "scontrol"
    script.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[03-04]" ] && '
                      'printf "gpu03\\ngpu04\\n"\n')  # fmt: skip
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_srun_task_variables(fake_scontrol):
    env = detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                  "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "1", "SLURM_NNODES": "2",
                  "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242",
                  "SLURM_JOB_NODELIST": "gpu[03-04]"})  # fmt: skip
    assert env == Env(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                      num_nodes=2, master_addr="gpu03", master_port=15000 + 4242,
                      launcher="slurm")  # fmt: skip


def test_srun_tasks_per_node_from_the_compressed_form(fake_scontrol):
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_TASKS_PER_NODE": "3(x2)",
                  "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[03-04]"})  # fmt: skip
    assert env.local_world_size == 3 and env.master_addr == "gpu03"


def test_unexpandable_nodelist_is_one_line(fake_scontrol):
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST='weird'"):
        detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                "SLURM_JOB_NODELIST": "weird"})  # fmt: skip


def test_non_integer_variable_is_one_line():
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        detect({"RANK": "0", "WORLD_SIZE": "two"})


def test_fault_spec():
    assert from_env({"DISTNN_FAULT": "crash@step:7,rank:1"}) == Fault("crash", 7, 1)
    assert (
        from_env({"DISTNN_FAULT": "crash@step:7,rank:1", "TORCHELASTIC_RESTART_COUNT": "1"}) is None
    )
    with pytest.raises(UserError, match="KIND@step:N,rank:R"):
        from_env({"DISTNN_FAULT": "boom"})
