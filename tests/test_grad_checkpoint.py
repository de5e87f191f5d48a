"""Activation checkpointing (model.grad_checkpointing): the same gradients and BatchNorm
statistics as without it, in one process, under DDP and FSDP on 2 ranks; one line under
DeepSpeed."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from distnn import config, models
from distnn.models import grad_checkpoint
from tests.conftest import FAST, assert_same_params, final_weights, one_line_error, torchrun

CASES = [("resnet18", {}, 32), ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32)]


@pytest.mark.parametrize("name, kwargs, size", CASES)
def test_recomputed_blocks_give_the_same_gradients_and_statistics(name, kwargs, size):
    torch.manual_seed(0)
    plain = models.build(name, 10, size, kwargs)
    checkpointed = copy.deepcopy(plain)
    line = grad_checkpoint.apply(checkpointed, [])
    assert "activation checkpointing" in line
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    for model in (plain, checkpointed):
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for (n, a), (m, b) in zip(plain.named_parameters(), checkpointed.named_parameters(),
                              strict=True):  # fmt: skip
        assert n == m and torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7), n
    for (n, a), (_, b) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        assert torch.equal(a, b), n  # running statistics updated once, not twice
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    if not name.startswith("timm:"):  # ResNet's blocks recompute: fewer tensors kept
        kinds = {type(m).__name__ for m in checkpointed.modules()}
        assert "BasicBlock" in kinds and "8 blocks (BasicBlock)" in line


RUN = [*FAST, "model.name=resnet18", "train.max_steps=4", "train.batch_size=8",
       "data.synthetic_train=128", "data.synthetic_val=32", "optim.lr=0.05", "precision=fp32",
       "ckpt.epoch_end=false", "dist.timeout_s=120"]  # fmt: skip


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_end_on_the_same_weights_with_and_without(tmp_path, strategy):
    for name, extra in (("plain", []), ("ac", ["model.grad_checkpointing=true"])):
        r = torchrun(2, "-m", "distnn.train", f"run.dir={tmp_path}", f"run.name={name}", *RUN,
                     f"strategy.name={strategy}", *extra, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    assert "activation checkpointing: 8 blocks (BasicBlock)" in r.stdout + r.stderr
    assert_same_params(final_weights(tmp_path / "ac"), final_weights(tmp_path / "plain"),
                       rtol=1e-6, atol=1e-7)  # fmt: skip


def test_deepspeed_refuses_it_in_one_line(tmp_path, capfd):
    from distnn.train import main

    line = one_line_error(main, [f"run.dir={tmp_path}", *RUN, "strategy.name=deepspeed",
                                 "model.grad_checkpointing=true"], capfd)  # fmt: skip
    assert "model.grad_checkpointing=true is not available with strategy.name=deepspeed" in line


def test_the_config_knows_it():
    assert config.load(None, ["model.grad_checkpointing=true"]).model.grad_checkpointing


def test_the_memory_benchmark_writes_its_row(tmp_path):
    from tests.conftest import run_cli

    r = run_cli("-m", "benchmarks.grad_checkpoint_memory", "--quick", "--repeats=2",
                f"--out={tmp_path}", timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads((tmp_path / "grad_checkpoint_memory.json").read_text())["rows"]
    assert row["model"] == "resnet18" and row["order"] == "ABBA"
    assert row["plain_memory_mib"]["median"] > 0 and row["time_ratio"]["median"] > 0
    assert "| resnet18 32 px, batch 8 |" in (tmp_path / "grad_checkpoint_memory.md").read_text()
