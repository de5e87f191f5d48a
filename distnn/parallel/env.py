"""Where this process sits in the job: torchrun, srun tasks, or a lone process."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from distnn.errors import UserError


@dataclass(frozen=True)
class Env:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: Literal["torchrun", "slurm", "single"] = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _first_host(nodelist: str) -> str:
    """Expand a Slurm nodelist (`gpu[01-04,07]`) with scontrol, as every node resolves it."""
    cannot = f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol"
    try:
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"{cannot}: {e}") from None
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        # A malformed list exits 0 (Slurm 22.05) with no host, its reason the last stderr line.
        why = result.stderr.strip().splitlines()[-1:] or [
            f"exit status {result.returncode}, no host printed"
        ]
        raise UserError(f"{cannot}: {why[0]}")
    return hosts[0]


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int:
    # SLURM_NTASKS_PER_NODE is only set with --ntasks-per-node; SLURM_TASKS_PER_NODE always is,
    # in the compressed form "2(x3),1" whose first entry is this layout's first node.
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    return int(env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])


def detect(environ: Mapping[str, str] | None = None) -> Env:
    """torchrun's variables first, then srun's task variables, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        return Env(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=world,
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK") if "GROUP_RANK" in env else 0,
            num_nodes=max(1, world // max(1, local_world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # Only srun-launched tasks have a step id; a batch script's shell does not and must
        # not mistake itself for rank 0 of a job step.
        job_id = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        return Env(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            world_size=_int(env, "SLURM_NTASKS"),
            local_world_size=_slurm_tasks_per_node(env),
            node_rank=_int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0,
            num_nodes=_int(env, "SLURM_NNODES") if "SLURM_NNODES" in env else 1,
            master_addr=env.get("MASTER_ADDR") or _first_host(nodelist),
            # A port derived from the job id lets concurrent jobs on one node coexist.
            master_port=(
                _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 15000 + job_id % 20000
            ),
            launcher="slurm",
        )
    return Env()


def export(env: Env, device_index: int) -> None:
    """Set torchrun's variables from `env` for a library that reads them itself, whatever
    launcher started this process. DeepSpeed asserts LOCAL_RANK (absent for a lone process
    and for srun tasks) and binds the GPU LOCAL_RANK names, so LOCAL_RANK is this rank's
    device index (where a launcher leaves one GPU per task visible, 0, not the local rank)."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(device_index),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", env.master_addr),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(env.master_port)),
    )
