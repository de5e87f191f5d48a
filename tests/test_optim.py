"""Optimizer groups and LR schedules, counted in optimizer steps."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from distnn import config, models, optim
from distnn.errors import UserError
from tests.conftest import FAST


def test_no_weight_decay_on_norms_and_biases():
    model = models.build("resnet18", 10, 32)
    groups = optim.param_groups(model, 5e-4, 0.1)
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


# --- layer-wise LR decay ------------------------------------------------------------------------


def _vit() -> torch.nn.Module:
    """timm's 6-block test ViT: layer ids 0 (patch embedding, tokens), 1-6 (blocks, the final
    norm with the last) and 7 (the head)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10)


def _groups_by_param(model: torch.nn.Module, groups: list[dict]) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    found = [(names[id(p)], g) for g in groups for p in g["params"]]
    assert len(found) == len(dict(found)), "a parameter in two groups"
    return dict(found)


def test_layer_decay_follows_timm_and_keeps_the_no_decay_group():
    from timm.optim import param_groups_layer_decay

    model = _vit()
    model.patch_embed.proj.weight.requires_grad_(False)
    cfg = config.load(None, ["optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05",
                             "optim.layer_decay=0.5"])  # fmt: skip
    opt = optim.Optimizers(cfg.optim, 256, "head")(model)
    ours = _groups_by_param(model, opt.param_groups)
    timms = _groups_by_param(model, param_groups_layer_decay(model, 0.05, layer_decay=0.5))
    assert "patch_embed.proj.weight" not in ours
    assert (
        ours.keys() == timms.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    )
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ours[name]["lr"] == pytest.approx(1e-3 * timms[name]["lr_scale"]), name
            assert ours[name]["weight_decay"] == (0.0 if p.ndim <= 1 else 0.05), name
    # lr × decay^(L - i), L = 7: the head at the full LR, the last block (and the final norm)
    # at half of it, the first block at 0.5^6, the patch embedding at 0.5^7.
    layers = {"head.weight": 0, "norm.weight": 1, "blocks.5.mlp.fc1.weight": 1,
              "blocks.0.attn.qkv.bias": 6, "patch_embed.proj.bias": 7, "pos_embed": 7}  # fmt: skip
    for name, below_top in layers.items():
        assert ours[name]["lr"] == pytest.approx(1e-3 * 0.5**below_top), name
    # Group 0 is what a run logs as its LR: the peak.
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)

    # The schedule multiplies each group's own LR.
    sched = optim.Schedule(config.load(None, ["sched.warmup_steps=2"]).sched, 10)(opt)
    for _ in range(4):
        opt.step()
        sched.step()
    factor = sched.lr_lambdas[0](4)
    for name in layers:
        assert ours[name]["lr"] == pytest.approx(1e-3 * 0.5 ** layers[name] * factor)


def test_layer_decay_composes_with_head_lr_scale():
    model = _vit()
    cfg = config.load(None, ["optim.lr=0.1", "optim.layer_decay=0.5", "optim.head_lr_scale=10"])
    ours = _groups_by_param(model, optim.Optimizers(cfg.optim, 256, "head").groups(model))
    assert ours["head.weight"]["lr"] == ours["head.bias"]["lr"] == pytest.approx(1.0)
    assert ours["norm.weight"]["lr"] == pytest.approx(0.05)
    assert ours["blocks.0.mlp.fc2.weight"]["lr"] == pytest.approx(0.1 * 0.5**6)
    assert ours["head.bias"]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.layer_decay=0.7", r"optim\.layer_decay needs timm's layer ids, from a model's "
                                  r"group_matcher, and ResNet has none"),
        ("optim.layer_decay=0", r"optim\.layer_decay must be in \(0, 1\] \(1: off\), got 0"),
        ("optim.name=lars", r"optim\.name=lars adapts .* with optim\.weight_decay=0 it is SGD"),
    ],
)  # fmt: skip
def test_settings_the_optimizer_cannot_honour_are_one_line(override, message):
    cfg = config.load(None, [override, "optim.weight_decay=0"])
    with pytest.raises(UserError, match=message):
        optim.Optimizers(cfg.optim, 256, "fc").groups(models.build("resnet18", 10, 32))


# --- large-batch optimizers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.name=lamb", "optim.betas=0.8,0.95", "optim.eps=1e-6"],
         {"betas": (0.8, 0.95), "eps": 1e-6, "max_grad_norm": None}),
        (["optim.name=lars", "optim.momentum=0.8", "optim.nesterov=true",
          "optim.trust_coeff=0.02"],
         {"momentum": 0.8, "nesterov": True, "trust_coeff": 0.02}),
    ],
)  # fmt: skip
def test_lamb_and_lars_are_timm_s_with_their_settings_and_learn(overrides, expected):
    from timm.optim import Lamb, Lars

    cfg = config.load(None, [*overrides, "optim.lr=0.05", "optim.weight_decay=1e-4"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = optim.Optimizers(cfg.optim, 256)(model)
    assert isinstance(opt, Lamb if cfg.optim.name == "lamb" else Lars)
    assert {k: opt.defaults[k] for k in expected} == expected and opt.defaults["lr"] == 0.05
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    bias = model[2].bias.detach().clone()
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert not torch.equal(model[2].bias, bias)  # the no-decay group steps too


def test_deepspeed_fused_adamw_gets_each_group_s_lr():
    """DeepSpeed puts its fused AdamW in torch's place: it takes the groups, LRs and all."""
    made = {}

    def fused(groups: list[dict], **kwargs) -> torch.optim.Optimizer:
        made.update(kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    model = _vit()
    cfg = config.load(None, ["optim.name=adamw", "optim.lr=1e-3", "optim.layer_decay=0.5"])
    opt = optim.Optimizers(cfg.optim, 256, "head")(model, fused)
    assert made == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    lrs = sorted({round(g["lr"] / 1e-3, 9) for g in opt.param_groups})
    assert lrs == [round(0.5**i, 9) for i in range(7, -1, -1)]


# --- must hold: LAMB and LARS at global batch 256 on 2 ranks ------------------------------------


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from distnn.data import digits

    root = tmp_path_factory.mktemp("digits")
    counts = digits.write(root)
    # 1,438 training images: 5 optimizer steps of 256 an epoch (the 158 left over, the next
    # epoch's permutation covers).
    assert counts == {"train": 1438, "val": 359}
    return root


# Tuned on tutorial_cnn (2 × 128 per rank, fp32): LARS's trust_coeff 0.02 with lr 1 gives the
# weights the step its default 0.001 gives at lr 20 while biases (no decay, so not adapted)
# step at 1: at lr 20 they would diverge.
LARGE_BATCH = {
    "lamb": ["optim.name=lamb", "optim.lr=0.04", "optim.weight_decay=0.01"],
    "lars": ["optim.name=lars", "optim.lr=1.0", "optim.trust_coeff=0.02", "optim.nesterov=true",
             "optim.weight_decay=5e-4"],
}  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(LARGE_BATCH))
def test_lamb_and_lars_learn_digits_at_global_batch_256_on_two_ranks(name, digits_dir, tmp_path):
    from tests.conftest import torchrun

    start = time.monotonic()
    r = torchrun(2, "-m", "distnn.train", f"run.dir={tmp_path}", f"run.name={name}", *FAST,
                 "data.source=imagefolder", f"data.root={digits_dir}", "data.hflip=false",
                 "model.name=tutorial_cnn", "precision=fp32", "train.global_batch=256",
                 "train.epochs=8", "train.eval_every=8", "sched.warmup_steps=5",
                 "ckpt.epoch_end=false", *LARGE_BATCH[name], timeout=280)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    print(f"{name}: val top-1 {summary['val_top1']:.4f} after {summary['steps']} steps of 256 "
          f"on 2 ranks, {time.monotonic() - start:.0f} s")  # fmt: skip
    assert summary["world_size"] == 2 and summary["steps"] == 8 * 5
    assert summary["val_top1"] >= 0.95
