"""The single-process trainer end to end: learning, run directory, checkpoints, resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from distnn import checkpoint, checkpoint_files, config
from distnn.monitor import read_metrics
from distnn.train import train
from tests.conftest import assert_same_params, final_weights

TRAIN_FIELDS = {"step", "epoch", "loss", "lr", "images_per_sec", "step_time_s", "data_wait",
                "elapsed_s"}  # fmt: skip
SUMMARY_FIELDS = {
    "train_loss", "val_loss", "val_top1", "val_top5", "images_per_sec", "steps", "epochs",
    "world_size", "wall_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run shared by the assertions below (tutorial_cnn on synthetic data)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = config.load(
        None,
        [
            f"run.dir={root}", "run.name=syn", "data.workers=0", "log.progress=off",
            "train.epochs=3", "train.batch_size=64", "optim.lr=0.05", "train.log_every=8",
            "sched.warmup_steps=5", "log.wandb.mode=disabled",  # W&B: see test_monitor.py
        ],
    )  # fmt: skip
    return cfg, train(cfg)


@pytest.mark.timeout(60)
def test_tutorial_cnn_learns_synthetic(trained):
    _, summary = trained
    assert summary["val_top1"] >= 0.9
    assert summary["val_top5"] >= summary["val_top1"]


def test_metrics_jsonl_has_the_fields(trained):
    cfg, _ = trained
    records = read_metrics(cfg.run_dir)
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_top1" in r]
    assert len(val_records) == 3  # one evaluation per epoch
    assert len(train_records) == 96 // 8  # 2048 // 64 = 32 steps × 3 epochs, every 8 steps
    for r in train_records:
        assert r.keys() >= TRAIN_FIELDS
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert 0 <= r["lr"] <= 0.05 + 1e-12
        assert r["images_per_sec"] > 0 and 0 <= r["data_wait"] <= 1
    steps = [r["step"] for r in train_records]
    assert steps == sorted(steps) and steps[-1] == 96
    # Wall time since training began: rising through train and eval records alike.
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and 0 < elapsed[0] < elapsed[-1]
    # The loss falls: the last interval is well below the first (chance is ln 10 = 2.30).
    assert train_records[-1]["loss"] < 0.5 * train_records[0]["loss"]
    for r in val_records:
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 1


def test_summary_and_config_written(trained):
    cfg, summary = trained
    on_disk = json.loads((cfg.run_dir / "summary.json").read_text())
    assert on_disk.keys() >= SUMMARY_FIELDS
    assert on_disk["steps"] == 96 and on_disk["epochs"] == 3 and on_disk["world_size"] == 1
    assert on_disk["val_top1"] == pytest.approx(summary["val_top1"])
    assert on_disk["wall_s"] > 0
    saved = config.from_dict(yaml.safe_load((cfg.run_dir / "config.yaml").read_text()))
    assert saved == cfg


def test_final_checkpoint_holds_the_run(trained):
    cfg, _ = trained
    state = checkpoint.load_file(cfg.run_dir)  # the run dir resolves through `latest`
    assert state["position"] == {"step": 96, "epoch": 3, "batch": 0}
    assert config.from_dict(state["config"]) == cfg
    assert {"model", "optimizer", "scheduler"} <= state["strategy"].keys()
    assert state["strategy"]["scheduler"]["last_epoch"] == 96
    assert len(state["classes"]) == 10


def test_checkpoint_files_are_atomic_and_pruned(make_cfg):
    cfg = make_cfg("run.name=keep", "train.max_steps=12", "train.batch_size=256",
                   "ckpt.every_steps=2", "ckpt.keep=2", "ckpt.epoch_end=false")  # fmt: skip
    train(cfg)
    ckpts = cfg.run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["best.pt", "latest", "step_00000010.pt", "step_00000012.pt"]
    assert (ckpts / "latest").read_text().strip() == "step_00000012.pt"
    # Evaluations ran at steps 8 and 12; best.pt is the better one, kept though pruned.
    evals = {r["step"]: r["val_top1"] for r in read_metrics(cfg.run_dir) if "val_top1" in r}
    best = checkpoint.load_file(ckpts / "best.pt")
    assert sorted(evals) == [8, 12]
    assert best["best_value"] == max(evals.values())
    assert evals[best["position"]["step"]] == max(evals.values())


def test_resume_continues_the_same_loss_curve(make_cfg, tmp_path):
    """Resuming from a mid-epoch checkpoint reproduces the uninterrupted run's later losses."""
    common = ["train.epochs=2", "train.batch_size=16", "data.synthetic_train=160",
              "data.synthetic_val=64", "data.image_size=16", "train.log_every=1",
              "ckpt.every_steps=5", "ckpt.keep=10", "model.name=alexnet_cifar"]  # fmt: skip
    full = make_cfg("run.name=full", *common)
    train(full)
    resumed = make_cfg("run.name=resumed", *common)
    ckpts = resumed.run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(full.run_dir / "checkpoints" / "step_00000005.pt", ckpts)
    (ckpts / "latest").write_text("step_00000005.pt\n")
    train(resumed)

    def losses(cfg):
        return {r["step"]: r["loss"] for r in read_metrics(cfg.run_dir) if "loss" in r}

    before, after = losses(full), losses(resumed)
    assert sorted(after) == list(range(6, 21))  # 160 // 16 = 10 steps/epoch, resumed at 5
    for step in after:  # alexnet has dropout: the RNG state is restored too
        assert after[step] == pytest.approx(before[step], rel=1e-6), step
    a = checkpoint_files.model_state(checkpoint.load_file(full.run_dir))
    b = checkpoint_files.model_state(checkpoint.load_file(resumed.run_dir))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_compile_and_channels_last_train_the_same_model(make_cfg, capsys):
    """torch.compile (inductor, C++ on CPU) and channels_last change how, not what: the
    losses and final weights match eager NCHW training. Where a C++ compiler exists, compile
    must have run (dynamo captured graphs; no eager-fallback note)."""
    import torch._dynamo

    common = ["train.max_steps=3", "train.log_every=1", "train.batch_size=32",
              "data.synthetic_train=128", "ckpt.epoch_end=false"]  # fmt: skip
    eager = make_cfg("run.name=eager", *common)
    fast = make_cfg("run.name=fast", *common, "model.compile=true", "model.channels_last=true")
    train(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(fast)
    out = capsys.readouterr().out
    if any(map(shutil.which, ("g++", "c++", "clang++"))):
        assert "model.compile=true ignored" not in out
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    else:
        assert "model.compile=true ignored: inductor needs a C++ compiler" in out
    got = [r["loss"] for r in read_metrics(fast.run_dir) if "loss" in r]
    want = [r["loss"] for r in read_metrics(eager.run_dir) if "loss" in r]
    assert got == pytest.approx(want, rel=1e-4) and len(got) == 3
    assert_same_params(final_weights(fast.run_dir), final_weights(eager.run_dir), rtol=1e-4,
                       atol=1e-5)  # fmt: skip


def test_extending_a_max_steps_run_continues_mid_epoch(make_cfg, capsys):
    """A run to max_steps=7 (mid-epoch: 10 steps/epoch), then the same run dir to 13: steps
    8-13 continue the epoch and the run ends with the weights of one run to 13; each attempt
    leaves a complete summary; a third attempt with nothing left changes nothing."""
    common = ["train.batch_size=64", "data.synthetic_train=640", "train.log_every=1",
              "sched.name=constant", "sched.warmup_steps=3"]  # fmt: skip
    whole = make_cfg("run.name=whole", *common, "train.max_steps=13")
    train(whole)
    short = make_cfg("run.name=grown", *common, "train.max_steps=7")
    first = train(short)
    assert first.keys() >= SUMMARY_FIELDS and first["epochs"] == 0.7
    assert checkpoint.load_file(short.run_dir)["position"] == {"step": 7, "epoch": 0, "batch": 7}

    grown = make_cfg("run.name=grown", *common, "train.max_steps=13")
    summary = train(grown)
    assert summary["steps"] == 13 and summary["epochs"] == 1.3
    saved = json.loads((grown.run_dir / "summary.json").read_text())
    assert all(saved[k] is not None for k in SUMMARY_FIELDS), saved
    losses = {r["step"]: r["loss"] for r in read_metrics(grown.run_dir) if "loss" in r}
    reference = {r["step"]: r["loss"] for r in read_metrics(whole.run_dir) if "loss" in r}
    assert sorted(losses) == list(range(1, 14))
    assert losses == pytest.approx(reference, rel=1e-6)
    a = checkpoint_files.model_state(checkpoint.load_file(grown.run_dir))
    b = checkpoint_files.model_state(checkpoint.load_file(whole.run_dir))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)

    # Nothing left to do: one line, and the run directory as it was.
    files = {p: p.read_bytes() for p in grown.run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    again = train(make_cfg("run.name=grown", *common, "train.max_steps=13"))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("nothing to do:") and "step 13 of 13" in out[0]
    assert again == saved
    assert {p: p.read_bytes() for p in grown.run_dir.rglob("*") if p.is_file()} == files

    # An attempt that reached the last step but died before its summary: the next one only
    # evaluates, and its summary still holds every value (loss and img/s from the checkpoint).
    (grown.run_dir / "summary.json").unlink()
    redone = train(make_cfg("run.name=grown", *common, "train.max_steps=13"))
    for key in ("train_loss", "val_loss", "val_top1", "images_per_sec", "steps"):
        assert redone[key] == pytest.approx(saved[key]), key


def test_extending_a_cosine_run_follows_the_longer_schedule_from_there(make_cfg):
    """With a decaying schedule the extension's LR at steps 8-13 is the 13-step run's: the
    schedule is a function of the run's total steps, applied from the resume step on."""
    common = ["train.batch_size=64", "data.synthetic_train=640", "train.log_every=1",
              "sched.warmup_steps=2"]  # fmt: skip
    whole = make_cfg("run.name=whole", *common, "train.max_steps=13")
    train(whole)
    train(make_cfg("run.name=grown", *common, "train.max_steps=7"))
    grown = make_cfg("run.name=grown", *common, "train.max_steps=13")
    train(grown)
    lr = {r["step"]: r["lr"] for r in read_metrics(grown.run_dir) if "lr" in r}
    reference = {r["step"]: r["lr"] for r in read_metrics(whole.run_dir) if "lr" in r}
    assert [lr[s] for s in range(8, 14)] == pytest.approx([reference[s] for s in range(8, 14)])
    assert lr[7] != pytest.approx(reference[7])  # the first attempt decayed over 7 steps
