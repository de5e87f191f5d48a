"""Devices and precisions: which GPU a rank takes, what is refused before any process group
forms, per-device RNG state, bf16 on CPUs that emulate it, loader workers per CPU.

The GPU cases run here with a faked CUDA (no GPU on this machine): in-process by patching
torch.cuda, and as real `python -m distnn.train` processes through a sitecustomize that patches
it at start-up. What needs a real GPU is in tests/test_cuda.py.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
import yaml

from distnn import checkpoint, config, precision
from distnn.errors import UserError
from distnn.parallel import dist
from distnn.parallel.env import Env
from distnn.train import train
from tests.conftest import FAST, run_cli


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("count", "local_rank", "launcher", "expected"),
    [(4, 3, "torchrun", 3), (8, 0, "torchrun", 0),
     (1, 3, "slurm", 0),  # srun --gpus-per-task=1: each task sees its own GPU
     (2, 3, "slurm", 1)],  # srun --gpus-per-task=2: the task's second GPU
)  # fmt: skip
def test_each_rank_takes_its_own_gpu(monkeypatch, count, local_rank, launcher, expected):
    fake_cuda(monkeypatch, count)
    env = Env(local_rank=local_rank, local_world_size=8, world_size=8, launcher=launcher)
    assert dist.device_for(env) == torch.device("cuda", expected)


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    fake_cuda(monkeypatch, 4)
    with pytest.raises(UserError, match=r"local rank 5 of 8 processes .* 4 GPUs are visible"):
        dist.device_for(Env(local_rank=5, local_world_size=8, world_size=8))


SITECUSTOMIZE = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: {count}
torch.cuda.set_device = lambda device: None
torch.cuda.is_bf16_supported = lambda including_emulation=True: False
torch.cuda.get_device_name = lambda device=None: "Tesla V100-SXM2-16GB"
"""


@pytest.mark.parametrize(
    ("count", "env", "args", "expected"),
    [
        (2, {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, [],
         "local rank 2 of 4 processes on this node has no GPU of its own: 2 GPUs"),
        (1, {}, ["precision=bf16"],
         "precision 'bf16' needs a GPU with bf16 (Ampere or newer); Tesla V100-SXM2-16GB has "
         "none: use precision=fp16"),
    ],
    ids=["more-ranks-than-gpus", "bf16-before-ampere"],
)  # fmt: skip
def test_gpu_refusals_are_one_line_before_any_process_group(tmp_path, count, env, args, expected):
    """Real processes on a faked CUDA. The first says it is rank 2 of 4 (torchrun's variables)
    with no peer running: a group would wait for them, the refusal comes before it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE.format(count=count)))
    pythonpath = f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    r = run_cli("-m", "distnn.train", f"run.dir={tmp_path}", *FAST, *args, "dist.timeout_s=5",
                env={**env, "PYTHONPATH": pythonpath}, timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {expected}"), err
    assert not (tmp_path / "default").exists()


def test_cuda_rng_state_is_the_rank_s_own_device(monkeypatch):
    """A rank saves and restores its current device's generator only: resuming where it sees
    fewer GPUs (srun with one GPU per task after 8 per process) raises nothing, and no rank
    takes another device's state."""
    fake_cuda(monkeypatch, 1)
    mine = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    state = checkpoint.rng_state()
    assert state["cuda"] is mine
    checkpoint.set_rng_state(state)
    assert restored == [mine]
    # A checkpoint of the former format (every visible device's state, here 8) is skipped.
    checkpoint.set_rng_state({**state, "cuda": [mine] * 8})
    assert restored == [mine]


def test_cpu_bf16_detection(tmp_path):
    avx2, bf16 = tmp_path / "avx2", tmp_path / "bf16"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert not precision.cpu_has_bf16(str(avx2))
    assert precision.cpu_has_bf16(str(bf16))
    assert precision.cpu_has_bf16(str(tmp_path / "absent"))  # unknown: no warning


def test_bf16_on_a_cpu_that_emulates_it_warns_in_one_line(make_cfg, capsys):
    cfg = make_cfg("precision=bf16", "data.image_size=8", "data.synthetic_train=32",
                   "data.synthetic_val=16", "train.batch_size=16", "train.max_steps=1",
                   "log.progress=lines")  # fmt: skip
    train(cfg)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "emulated" in line]
    if precision.cpu_has_bf16():
        assert warnings == []
    else:
        assert len(warnings) == 1 and "precision=bf16 on a CPU without avx512_bf16" in warnings[0]
    assert precision.build("fp32", torch.device("cpu")).warning is None


def test_loader_workers_default_to_the_cpus_per_local_rank(monkeypatch, make_cfg):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [config.default_workers(n) for n in (1, 2, 3, 8, 32)] == [8, 8, 5, 2, 1]
    # Bound to 4 of the node's CPUs (srun --cpus-per-task=4): those are this rank's share.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert [config.default_workers(n) for n in (1, 4, 8)] == [4, 4, 4]
    cfg = config.load(None, ["data.synthetic_train=64"])
    assert cfg.data.workers is None
    resolved = config.for_world(cfg, world_size=4, local_world_size=4)
    assert resolved.data.workers == 4
    assert config.for_world(config.load(None, ["data.workers=0"]), 4, 4).data.workers == 0
    # The run saves the resolved number: a resume reads the workers the run had.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one CPU of 16
    run = make_cfg("data.workers=null", "train.max_steps=1", "data.synthetic_train=256")
    train(run)
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["data"]["workers"] == 1
