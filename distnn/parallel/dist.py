"""Process group lifecycle and the few collectives the loop needs, all with timeouts."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as td

from distnn.config import DistConfig
from distnn.errors import UserError
from distnn.parallel.env import Env


def device_for(env: Env) -> torch.device:
    """This rank's device: GPU `local_rank` of the node's visible GPUs, or, where srun binds
    GPUs per task, GPU `local_rank` mod the task's GPUs; else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.launcher != "slurm" and count > 1 and env.local_rank >= count:
        # torchrun's workers all see the node's GPUs: two ranks would share one, and NCCL
        # refuses them later with a cryptic duplicate-GPU error. (srun may give each task GPUs
        # of its own, --gpus-per-task or --gpu-bind: there the task takes one of those.)
        raise UserError(
            f"local rank {env.local_rank} of {env.local_world_size} processes on this node has "
            f"no GPU of its own: {count} GPUs are visible; start at most {count} processes per "
            "node (torchrun --nproc_per_node, srun --ntasks-per-node)"
        )
    return torch.device("cuda", env.local_rank % count)


def use_device(env: Env) -> torch.device:
    """device_for, made the current CUDA device at once: anything allocated before the model
    moves (NCCL's communicator, cuDNN handles, the CUDA context itself) lands on this rank's
    GPU, not on GPU 0."""
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def backend_for(device: torch.device, cfg: DistConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init(env: Env, cfg: DistConfig, alone: bool = False) -> torch.device:
    """Pick this rank's device and, above one process (or `alone`, for a strategy that runs
    collectives), join the process group."""
    device = use_device(env)  # before init: NCCL binds its communicator to the current device
    if (env.distributed or alone) and not td.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        td.init_process_group(
            backend=backend_for(device, cfg),
            # A group of one needs no rendezvous (nor a port that another run may hold).
            store=_store(env, timeout) if env.distributed else td.HashStore(),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return device


def _store(env: Env, timeout: datetime.timedelta) -> td.Store:
    """The env:// store, under a prefix of its own for each torchrun restart. After a restart
    torchrun hands the new workers the same agent store, which still holds the failed
    attempt's gloo addresses: without the prefix the new group dials dead ports and never
    forms (seen with torch 2.14 under --max-restarts). Without the shared agent store
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as launch/multi_node.sh sets) every rendezvous
    round gets a fresh store and no prefix: the restart count is per node, and a node that
    joins an elastic job later counts from 0 while the others have restarted."""
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    store, _, _ = next(td.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return td.PrefixStore(f"distnn/attempt_{attempt}", store)


def teardown() -> None:
    if td.is_initialized():
        td.destroy_process_group()


@contextlib.contextmanager
def process_group(env: Env, cfg: DistConfig, alone: bool = False) -> Iterator[torch.device]:
    """init on entry, destroy on every exit path: a rank that raises must not leave peers
    waiting on a group that never closes."""
    try:
        yield init(env, cfg, alone)
    finally:
        teardown()


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (identity in a single process)."""
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether every rank says yes: one small all_reduce, used at step boundaries only."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    return all_reduce_sum(t).item() == 0.0


def any_true(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return all_reduce_sum(t).item() > 0.0


def agree(value: object, what: str, remedy: str) -> None:
    """One line on every rank where the ranks hold different values of `what`."""
    values = gather_objects(value)
    if any(v != values[0] for v in values):
        each = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise UserError(f"the ranks differ in {what} ({each}): {remedy}")


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (pickled: small things only)."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [value]
    values: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(values, value)
    return values


def barrier() -> None:
    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()
