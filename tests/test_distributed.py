"""Data parallelism is exact: real torchrun processes over gloo, compared with one process."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from distnn import config
from distnn.monitor import read_metrics
from distnn.train import train
from tests.conftest import (
    EQUIVALENCE,
    FAST,
    assert_same_params,
    final_weights,
    losses,
    torchrun,
)

# A small fp32 problem: tutorial_cnn (no BatchNorm, no dropout), so the math is the same
# whatever the split; 6 optimizer steps of global batch 32.
COMMON = [*FAST, "train.max_steps=6", "train.log_every=1", "data.synthetic_train=512",
          "optim.lr=0.05", "ckpt.epoch_end=false", "precision=fp32"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 32: what every split below must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    cfg = config.load(None, [f"run.dir={root}", "run.name=one", *COMMON, "train.batch_size=32"])
    train(cfg)
    return cfg.run_dir


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_rank_with_double_batch(tmp_path, reference):
    r = torchrun(2, "-m", "distnn.train", f"run.dir={tmp_path}", "run.name=two",
                 *COMMON, "train.batch_size=16", "log.progress=lines")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "two"
    assert_same_params(final_weights(run_dir), final_weights(reference))
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    # Rank 0 alone logs and writes: one run dir (and its lock), one line per step, one
    # closing line.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".two.lock", "two"]
    assert r.stdout.count("done:") == 1
    assert sum(line.startswith("step ") for line in r.stdout.splitlines()) == 7  # 6 + eval


@pytest.mark.timeout(240)
def test_ddp_on_one_process_forms_a_group_of_one(tmp_path, reference):
    """torchrun --nproc_per_node=1 with strategy.name=ddp (one GPU's DDP): a process group of
    one, and the single process's weights."""
    r = torchrun(1, "-m", "distnn.train", f"run.dir={tmp_path}", "run.name=one_ddp", *COMMON,
                 "train.batch_size=32", "strategy.name=ddp", "log.progress=lines")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "strategy: ddp over gloo, 1 processes" in r.stdout
    assert_same_params(final_weights(tmp_path / "one_ddp"), final_weights(reference))


def test_accumulation_equals_one_big_step_single_rank(make_cfg, reference):
    cfg = make_cfg("run.name=accum", *COMMON, "train.batch_size=16", "train.accum_steps=2")
    summary = train(cfg)
    assert summary["steps"] == 6
    assert_same_params(final_weights(cfg.run_dir), final_weights(reference))
    assert losses(cfg.run_dir) == pytest.approx(losses(reference), rel=1e-5)


@pytest.mark.timeout(240)
def test_accumulation_on_two_ranks_reduces_once_per_step(tmp_path, reference):
    r = torchrun(2, "tests/scripts/count_allreduce.py", f"run.dir={tmp_path}", "run.name=acc2",
                 *COMMON, "train.batch_size=8", "train.accum_steps=2")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_params(final_weights(tmp_path / "acc2"), final_weights(reference))
    # 12 micro-batches per rank, one bucket (145k params): all-reduce on the 6 final ones only.
    counted = json.loads(r.stdout.strip().splitlines()[-1])
    assert counted == {"allreduce_calls": 6}


@pytest.mark.timeout(120)
def test_exception_on_one_rank_ends_the_job(tmp_path):
    """Rank 0 waits in a collective rank 1 never joins; with a 600 s collective timeout only
    torchrun stopping it, once rank 1 has failed, ends the job within the test's 110 s."""
    start = time.monotonic()
    r = torchrun(2, "-m", "distnn.train", f"run.dir={tmp_path}", *FAST, "train.epochs=5",
                 "train.batch_size=16", "dist.timeout_s=600",
                 env={"DISTNN_FAULT": "raise@step:3,rank:1"}, timeout=110)  # fmt: skip
    assert r.returncode != 0
    assert "injected fault (DISTNN_FAULT) on rank 1 at step 3" in r.stderr
    assert time.monotonic() - start < 100  # a rank left to its own timeout would take 600 s


def test_bf16_on_cpu_learns(make_cfg):
    from distnn import precision

    with precision.build("bf16", torch.device("cpu")).autocast():
        assert torch.nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    # bf16 is emulated on CPUs without avx512_bf16 (25x slower here): 16 px keeps it short.
    cfg = make_cfg("run.name=bf16", "precision=bf16", "train.epochs=3", "train.batch_size=32",
                   "data.synthetic_train=512", "data.synthetic_val=256", "data.image_size=16",
                   "optim.lr=0.05", "train.log_every=4")  # fmt: skip
    summary = train(cfg)
    first, last = (r["loss"] for r in (read_metrics(cfg.run_dir)[0], read_metrics(cfg.run_dir)[-2]))
    assert summary["val_top1"] >= 0.3  # chance is 0.1
    assert last < 0.85 * first


def test_fp16_on_cpu_is_refused_clearly(make_cfg):
    from distnn.errors import UserError

    with pytest.raises(UserError, match=r"precision 'fp16' needs a CUDA device.*bf16"):
        train(make_cfg("precision=fp16"))


def test_global_batch_not_divisible_by_world_is_refused(make_cfg):
    from distnn.errors import UserError

    cfg = make_cfg("train.global_batch=100", "train.accum_steps=3")
    assert config.for_world(make_cfg("train.global_batch=96", "train.accum_steps=3"), 2)
    with pytest.raises(UserError, match=r"train.global_batch=100 .* world size 2 .* multiple of 6"):
        config.for_world(cfg, 2)
    assert config.for_world(make_cfg("train.global_batch=96"), 4).train.batch_size == 24


def test_fp16_scaler_skips_overflows_and_discard_shrinks_the_scale():
    """The GradScaler path (real torch.amp.GradScaler, run on CPU tensors): an overflowing step
    is skipped and halves the scale; dropping a non-finite step (train.nonfinite=skip) after
    the gradients were unscaled works twice in a row and shrinks the scale too."""
    from distnn.optim import Optimizers, Schedule
    from distnn.parallel.single import SingleProcess
    from distnn.precision import Precision

    model = torch.nn.Linear(4, 2)
    sgd = config.OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    strategy = SingleProcess(Precision("fp16", torch.device("cpu")))
    strategy.setup(model, Optimizers(sgd, 1), Schedule(config.SchedConfig(name="constant"), 9))
    scale = strategy.scaler.get_scale()

    def backward(value: float) -> torch.Tensor:
        strategy.backward(model(torch.full((1, 4), value)).sum())
        return strategy.clip_grad_norm(1.0)

    before = model.weight.detach().clone()
    backward(float("inf"))
    assert not bool(strategy.step())
    assert torch.equal(model.weight, before) and strategy.scaler.get_scale() == scale / 2
    assert torch.isfinite(backward(1.0))
    assert bool(strategy.step()) and not torch.equal(model.weight, before)
    for _ in range(2):
        assert not torch.isfinite(backward(float("nan")))
        strategy.discard()
    assert strategy.scaler.get_scale() == scale / 8
    assert all(p.grad is None for p in model.parameters())


def test_sync_batchnorm_on_cpu_is_refused_before_training(make_cfg):
    from distnn import parallel, precision
    from distnn.errors import UserError
    from distnn.parallel.env import Env

    env = Env(world_size=2, local_world_size=2, launcher="torchrun")
    cfg = make_cfg("strategy.ddp.sync_batchnorm=true")
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match=r"strategy.ddp.sync_batchnorm=true needs GPUs"):
        parallel.build(cfg, env, cpu, precision.build("fp32", cpu))


def test_resume_at_another_world_size_says_so(make_cfg, ddp_reference, capsys):
    """A checkpoint of 2 processes (conftest's DDP reference, 2 × 8) resumed by 1 with
    train.batch_size=8: it continues, and says in one line that the run no longer follows the
    uninterrupted one."""
    cfg = make_cfg("run.name=grown", *EQUIVALENCE, "train.batch_size=8", "train.max_steps=11",
                   "log.progress=lines")  # fmt: skip
    shutil.copytree(ddp_reference, cfg.run_dir)
    train(cfg)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: the checkpoint was written by 2 processes, this run has 1: it continues, but not "
        "exactly as an uninterrupted run (the global batch changes from 16 to 8); resume on 2 "
        "processes for that"
    ]
    assert json.loads((cfg.run_dir / "summary.json").read_text())["steps"] == 11
