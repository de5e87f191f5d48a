"""Recipe pieces: MixUp/CutMix targets and their seeding, the EMA against its closed form, and
runs that pick and export the EMA."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distnn import checkpoint, checkpoint_files, config, mixing
from distnn.ema import Averaging
from distnn.errors import UserError
from distnn.monitor import read_metrics
from distnn.optim import Optimizers, Schedule
from distnn.parallel.single import SingleProcess
from distnn.precision import build as build_precision
from distnn.predict import main as predict
from distnn.train import train


def _train_cfg(*overrides: str) -> config.TrainConfig:
    return config.load(None, list(overrides)).train


def _images(n: int = 8, size: int = 16) -> torch.Tensor:
    # Sample i is the constant i + 1 in every channel: a pixel tells which samples made it.
    return torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size)


def test_mixup_targets_sum_to_one_and_carry_lambda():
    mixer = mixing.build_mixer(_train_cfg("train.mixup_alpha=0.4", "train.seed=3"), 10, rank=0)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    x, target = mixer(_images().clone(), y, step=5, micro=1)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    # Sample i is lam·(i+1) + (1-lam)·(8-i): lam from the pixels, then the targets must match.
    lam = float((x[0, 0, 0, 0] - 8) / (1 - 8))
    assert 0 < lam < 1
    assert target[0, 0].item() == pytest.approx(lam, abs=1e-5)
    assert target[0, 7].item() == pytest.approx(1 - lam, abs=1e-5)


def test_cutmix_targets_match_the_pasted_area_and_smoothing_is_folded_in():
    cfg = _train_cfg("train.cutmix_alpha=1.0", "train.label_smoothing=0.1")
    mixer = mixing.build_mixer(cfg, 10, rank=0)
    seen = 0
    for step in range(20):
        y = torch.arange(8)
        x, target = mixer(_images().clone(), y, step=step, micro=0)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        own = (x[0, 0] == 1).float().mean().item()  # pixels still sample 0's own
        if own == 1.0:
            continue  # no box this time (lambda near 1 clips to nothing)
        seen += 1
        # Smoothed one-hot: on = 1 - 0.1 + 0.01, off = 0.01; mixed by the kept area.
        want_own = own * 0.91 + (1 - own) * 0.01
        assert target[0, 0].item() == pytest.approx(want_own, abs=1e-5)
        assert target[0, 7].item() == pytest.approx((1 - own) * 0.91 + own * 0.01, abs=1e-5)
    assert seen >= 10


def test_the_same_seed_step_micro_batch_and_rank_mix_the_same_and_the_global_rng_is_untouched():
    cfg = _train_cfg("train.mixup_alpha=0.8", "train.cutmix_alpha=1.0")
    mix = mixing.build_mixer(cfg, 10, rank=1)
    y = torch.arange(8)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = mix(_images().clone(), y, step=7, micro=2)
    assert (np.random.get_state()[1] == before).all()
    b = mix(_images().clone(), y, step=7, micro=2)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    others = [mix(_images().clone(), y, step=s, micro=m)[1] for s, m in ((8, 2), (7, 3))]
    others.append(mixing.build_mixer(cfg, 10, rank=0)(_images().clone(), y, step=7, micro=2)[1])
    assert all(not torch.equal(a[1], o) for o in others)


def test_mixing_needs_an_even_micro_batch():
    with pytest.raises(UserError, match=r"even per-process train\.batch_size, got 7"):
        mixing.build_mixer(_train_cfg("train.mixup_alpha=0.2", "train.batch_size=7"), 10, 0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1)"),
        ("train.mix_prob=1.5", "'train.mix_prob' is a probability"),
        ("ckpt.export_ema=true", "ckpt.export_ema=true needs an EMA"),
        ("ckpt.best_metric=val_top1_ema", "needs an EMA: set train.ema_decay"),
    ],
)
def test_bad_recipe_settings_are_one_line(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        config.load(None, [override])


def test_ema_equals_its_closed_form_on_a_linear_model():
    """After n steps with decay d and no warmup: e_1 = w_1 (timm's first update copies), then
    e_k = d·e_(k-1) + (1-d)·w_k, so e_n = d^(n-1)·w_1 + Σ_(k=2..n) (1-d)·d^(n-k)·w_k."""
    torch.manual_seed(0)
    d, n = 0.7, 9
    model = nn.Linear(4, 3)
    strategy = SingleProcess(build_precision("fp32", torch.device("cpu")))
    cfg = config.load(None, ["optim.lr=0.5", "optim.weight_decay=0", f"train.ema_decay={d}"])
    strategy.setup(model, Optimizers(cfg.optim, 8), Schedule(cfg.sched, n), Averaging(cfg.train))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    seen = []
    for step in range(1, n + 1):
        strategy.backward(nn.functional.cross_entropy(model(x), y))
        strategy.step()
        strategy.ema.update(step)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name in ("weight", "bias"):
        w = [s[name] for s in seen]
        want = d ** (n - 1) * w[0] + sum((1 - d) * d ** (n - k) * w[k - 1] for k in range(2, n + 1))
        torch.testing.assert_close(strategy.ema.state_dict()[name], want, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(want, w[-1], rtol=1e-3)  # the average is not the last weights
    # Evaluated in the model's place, then the weights come back unchanged.
    with strategy.ema.swapped():
        torch.testing.assert_close(model.weight.detach(), strategy.ema.state_dict()["weight"])
    torch.testing.assert_close(model.weight.detach(), seen[-1]["weight"], rtol=0, atol=0)


@pytest.mark.timeout(240)
def test_best_checkpoint_follows_the_ema_metric_and_the_ema_export_predicts(make_cfg, tmp_path):
    cfg = make_cfg("data.synthetic_train=256", "data.synthetic_val=128", "train.batch_size=32",
                   "train.epochs=4", "optim.lr=0.05", "train.ema_decay=0.6",
                   "ckpt.best_metric=val_top1_ema", "ckpt.export_ema=true",
                   "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0")  # fmt: skip
    summary = train(cfg)
    evals = [r for r in read_metrics(cfg.run_dir) if "val_top1_ema" in r]
    assert len(evals) == 4
    assert summary["val_top1_ema"] == evals[-1]["val_top1_ema"]
    best = max(evals, key=lambda r: r["val_top1_ema"])  # the first of equals stays best
    best_state = checkpoint.load_file(cfg.run_dir / "checkpoints" / "best.pt")
    assert best_state["position"]["step"] == best["step"]
    assert best_state["best_value"] == best["val_top1_ema"]

    out = checkpoint.export(cfg.run_dir, tmp_path / "model.safetensors")
    assert json.loads(out.with_suffix(".json").read_text())["weights"] == "ema"
    exported = load_file(out)
    ema = checkpoint.load_file(cfg.run_dir)["strategy"]["ema"]
    plain = checkpoint_files.model_state(checkpoint.load_file(cfg.run_dir))
    assert exported.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(exported[k], ema[k], rtol=0, atol=0)
    assert any(not torch.equal(exported[k], plain[k]) for k in plain)
    assert checkpoint.export(cfg.run_dir, tmp_path / "w.safetensors", ema=False)
    last = list(plain)[-1]
    weights = load_file(tmp_path / "w.safetensors")
    torch.testing.assert_close(weights[last], plain[last], rtol=0, atol=0)

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(images / "a.png")
    (row,) = predict(["--checkpoint", str(out), "--topk", "1", str(images / "a.png")])
    name, p = row["class_1"], row["prob_1"]
    assert "class_2" not in row and 0 < p <= 1
    assert name in checkpoint.load_file(cfg.run_dir)["classes"]
