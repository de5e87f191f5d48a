"""The presets in configs/: each loads, and each recipe trains a few steps with every piece it
sets (augmentation policy, erasing, MixUp/CutMix, EMA, layer decay) on small synthetic data."""

from __future__ import annotations

import math

import pytest

from distnn import config
from distnn.train import train
from tests.conftest import FAST, ROOT

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))

# What the published recipe needs from its preset: the run is that recipe only if these hold.
RECIPES = {
    "imagenet_resnet50.yaml": {"data.augment": "trivialaugment", "train.mixup_alpha": 0.2,
                               "train.cutmix_alpha": 1.0, "train.global_batch": 1024,
                               "train.epochs": 600},
    "cifar10_resnet18.yaml": {"train.global_batch": 128, "optim.lr": 0.1, "train.epochs": 200},
    "imagenet_vit_b16_finetune.yaml": {"optim.layer_decay": 0.65, "train.mixup_alpha": 0.8,
                                       "optim.name": "adamw", "train.epochs": 100},
}  # fmt: skip


def _get(cfg: config.Config, dotted: str) -> object:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads(path):
    cfg = config.load(path)
    for key, want in RECIPES.get(path.name, {}).items():
        assert _get(cfg, key) == want, key


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name, size, extra",
    [
        ("imagenet_resnet50.yaml", 96, ["train.ema_every=1"]),
        ("cifar10_resnet18.yaml", 32, []),
        ("imagenet_vit_b16_finetune.yaml", 96, ["model.kwargs.img_size=96", "model.init_from="]),
    ],
)
def test_recipe_preset_trains(tmp_path, name, size, extra):
    """Two steps of the preset's own model and recipe at a small image size, in fp32 (the CPU
    may lack bf16), on synthetic data."""
    cfg = config.load(ROOT / "configs" / name, [
        f"run.dir={tmp_path}", *FAST, "data.source=synthetic", "data.synthetic_train=16",
        "data.synthetic_val=8", f"data.image_size={size}", "train.global_batch=8",
        "train.max_steps=2", "precision=fp32", "sched.warmup_steps=1", *extra,
    ])  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    if cfg.train.ema_decay:
        assert 0 <= summary["val_top1_ema"] <= 1
