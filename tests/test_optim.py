"""Optimizer groups and LR schedules, counted in optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch

from distnn import config, models, optim


def test_no_weight_decay_on_norms_and_biases():
    model = models.build("resnet18", 10, 32)
    groups = optim.param_groups(model, 5e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    assert groups[1]["weight_decay"] == 0.0


def _lrs(*overrides: str, total: int = 100, batch: int = 256) -> list[float]:
    cfg = config.load(None, list(overrides))
    opt = optim.Optimizers(cfg.optim, batch)(torch.nn.Linear(2, 2))
    sched = optim.Schedule(cfg.sched, total)(opt)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_cosine():
    lrs = _lrs("optim.lr=1.0", "sched.warmup_steps=10", "sched.min_lr_ratio=0.1")
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert min(lrs) >= 0.1 - 1e-9 and lrs == [*lrs[:10], *sorted(lrs[10:], reverse=True)]


def test_step_schedule_and_constant():
    lrs = _lrs("optim.lr=1.0", "sched.name=step", "sched.step_size=30", "sched.gamma=0.5")
    assert (lrs[0], lrs[29], lrs[30], lrs[60], lrs[99]) == pytest.approx((1, 1, 0.5, 0.25, 0.125))
    assert set(_lrs("optim.lr=0.3", "sched.name=constant")) == {0.3}


def test_linear_lr_scaling_by_global_batch():
    assert _lrs("optim.lr=0.1", "optim.scale_lr=true", "sched.name=constant", batch=1024)[0] == (
        pytest.approx(0.4)
    )
    assert _lrs("optim.lr=0.1", "sched.name=constant", batch=1024)[0] == pytest.approx(0.1)


def test_adamw_uses_its_settings():
    cfg = config.load(None, ["optim.name=adamw", "optim.betas=0.8,0.95", "optim.lr=3e-4"])
    opt = optim.Optimizers(cfg.optim, 256)(torch.nn.Linear(2, 2))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["lr"] == 3e-4
