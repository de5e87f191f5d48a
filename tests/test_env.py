"""Where a process sits in the job, from each launcher's variables."""

from __future__ import annotations

import re

import pytest

from distnn.errors import UserError
from distnn.faults import Fault, from_env
from distnn.parallel.env import Env, detect
from tests import cluster


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
def scontrol(tmp_path, monkeypatch):
    """The real scontrol expands the nodelists, installed as the cluster tests install it.
    `scontrol show hostnames` needs no daemon, only a slurm.conf that names the cluster and
    its controller; without SlurmctldHost it exits 1, "No SlurmctldHost defined"."""
    cluster.install(programs=["scontrol"])
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=distnn\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))


def test_srun_task_variables(scontrol):
    env = detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                  "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "1", "SLURM_NNODES": "2",
                  "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242",
                  "SLURM_JOB_NODELIST": "gpu[03-04]"})  # fmt: skip
    assert env == Env(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                      num_nodes=2, master_addr="gpu03", master_port=15000 + 4242,
                      launcher="slurm")  # fmt: skip


def test_srun_tasks_per_node_from_the_compressed_form(scontrol):
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_TASKS_PER_NODE": "3(x2)",
                  "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[03-04]"})  # fmt: skip
    assert env.local_world_size == 3 and env.master_addr == "gpu03"


def srun_task(nodelist: str) -> Env:
    return detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                   "SLURM_JOB_NODELIST": nodelist})  # fmt: skip


def test_master_is_the_first_host_the_nodelist_names(scontrol):
    # In the list's own order, not sorted; a bare name is a host of its own.
    assert srun_task("gpu[07,03-04],cpu1").master_addr == "gpu07"
    assert srun_task("node[01-03],gpu7").master_addr == "node01"
    assert srun_task("weird").master_addr == "weird"


def test_unexpandable_nodelist_is_one_line(scontrol):
    # A reversed range: scontrol (22.05) exits 0 with no host, "Invalid hostlist" on stderr.
    with pytest.raises(UserError, match=re.escape("SLURM_JOB_NODELIST='gpu[04-03]'")) as e:
        srun_task("gpu[04-03]")
    assert "\n" not in str(e.value) and "Invalid hostlist" in str(e.value), str(e.value)


@pytest.mark.parametrize("required, outcome", [
    ("1", pytest.fail.Exception), ("", pytest.skip.Exception), ("0", pytest.skip.Exception)
])  # fmt: skip
def test_no_slurm_fails_only_where_required(tmp_path, monkeypatch, required, outcome):
    """Where Slurm cannot be had, cluster tests skip, or fail with DISTNN_REQUIRE_CLUSTER=1."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm, no apt-get to install it
    monkeypatch.setenv(cluster.REQUIRE, required)
    with pytest.raises(outcome, match="Slurm"):
        cluster.install()


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
