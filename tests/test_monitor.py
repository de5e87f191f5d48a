"""Watching runs: W&B offline files, TensorBoard events, rank-0-only writing, FLOPs and MFU.

Real runs, read back with the trackers' own formats: the `.wandb` file through
distnn.monitor.wandb_reader (leveldb-log framing → wandb's protobuf Records) and the event
files through tensorboard's EventAccumulator, compared with metrics.jsonl.
"""

from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from distnn import checkpoint_files, config
from distnn.monitor import Run, read_metrics, wandb_reader
from distnn.monitor import throughput as tp
from distnn.monitor import wandb as wandb_sink
from distnn.parallel.env import Env
from distnn.train import train
from tests.conftest import FAST, run_cli

SMALL = ["data.synthetic_train=256", "data.synthetic_val=64", "train.batch_size=32",
         "train.log_every=2", "log.wandb.mode=offline"]  # fmt: skip
NOTES = "n" * 70_000  # the run record then spans three 32 KiB blocks of the .wandb file
WANDB_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "NETRC")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No key in the environment and a HOME with no .netrc: what a compute node looks like."""
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def load(root: Path, *overrides: str) -> config.Config:
    return config.load(None, [f"run.dir={root}", *FAST, *SMALL, *overrides])


def offline_dirs(cfg: config.Config) -> list[Path]:
    return sorted((cfg.run_dir / "wandb").glob("offline-run-*"))


def by_step(records: list[dict]) -> dict[int, dict]:
    """metrics.jsonl as W&B stores it: records of one step merge into one row, later wins."""
    rows: dict[int, dict] = {}
    for r in records:
        rows.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real 8-step run with W&B offline and TensorBoard on."""
    root = tmp_path_factory.mktemp("monitor")
    with pytest.MonkeyPatch.context() as mp:
        for name in WANDB_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("HOME", str(root / "home"))
        cfg = load(root, "run.name=watched", "train.epochs=1", f"log.wandb.notes={NOTES}",
                   "log.wandb.tags=a,b", "log.wandb.log_checkpoints=true",
                   "log.tensorboard_graph=true")  # fmt: skip
        summary = train(cfg)
    return cfg, summary


def test_offline_wandb_file_matches_metrics_jsonl(trained):
    cfg, _ = trained
    dirs = offline_dirs(cfg)
    assert len(dirs) == 1
    run_id = (cfg.run_dir / "wandb_id").read_text().strip()
    assert dirs[0].name.endswith(f"-{run_id}")
    records = read_metrics(cfg.run_dir)
    expected = by_step(records)
    keys = {k for r in records for k in r} - {"step"}
    rows = wandb_reader.history(dirs[0])
    metric_rows = {r["_step"]: r for r in rows if keys & set(r)}
    assert len(metric_rows) == len([r for r in rows if keys & set(r)])  # one row per step
    assert sorted(metric_rows) == sorted(expected) == [2, 4, 6, 8]
    for step, want in expected.items():
        got = metric_rows[step]
        assert set(want) <= set(got), (step, set(want) - set(got))
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (step, key)
    # Every field the issue lists is there, train and eval.
    train_keys = set().union(*(r.keys() for r in records if "loss" in r))
    assert {"loss", "lr", "grad_norm", "images_per_sec", "images_per_sec_per_device",
            "data_wait", "step_time_s", "memory_gib", "skipped_steps",
            "data_errors"} <= train_keys  # fmt: skip
    assert {"val_loss", "val_top1", "val_top5"} <= set(metric_rows[8])
    assert "mfu" not in train_keys  # CPU: no peak to divide by, so no MFU at all


def test_offline_wandb_run_record_summary_images_and_model(trained):
    cfg, summary = trained
    path = offline_dirs(cfg)[0]
    info = wandb_reader.run_info(path)
    assert info["id"] == (cfg.run_dir / "wandb_id").read_text().strip()
    assert (info["project"], info["name"], info["group"]) == ("distnn", "watched", "watched")
    assert info["tags"] == ["a", "b"] and info["notes"] == NOTES  # read across block borders
    assert info["config"]["train"]["batch_size"] == 32  # the resolved config
    assert info["config"]["log"]["wandb"]["mode"] == "offline"
    on_disk = wandb_reader.summary(path)
    for key in ("val_top1", "val_loss", "train_loss", "steps"):
        assert on_disk[key] == pytest.approx(summary[key], rel=1e-6)
    # One image grid, logged once, denormalised to real pixels.
    grids = [r["train_batch"] for r in wandb_reader.history(path) if "train_batch" in r]
    assert len(grids) == 1 and grids[0]["_type"] == "image-file"
    from PIL import Image

    image = Image.open(path / "files" / grids[0]["path"])
    assert image.size == (6 * 34 + 2, 6 * 34 + 2)  # 32 images of 32 px, 6 per row, 2 px gaps
    # log_checkpoints: the exported model (what predict reads) is the artifact's file.
    exported = checkpoint_files.load_any(cfg.run_dir / "model.safetensors")
    assert len(exported["classes"]) == 10 and exported["config"]["run"]["name"] == "watched"
    weights = checkpoint_files.model_state(checkpoint_files.load_file(cfg.run_dir))
    assert set(exported["model"]) == set(weights)
    artifacts = [r for r in wandb_reader.records(path) if r.WhichOneof("record_type") == "artifact"]
    assert len(artifacts) == 1 and artifacts[0].artifact.type == "model"
    files = {e.path for e in artifacts[0].artifact.manifest.contents}
    assert files == {"model.safetensors", "model.json"}


def test_tensorboard_scalars_match_metrics_jsonl(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = trained
    acc = EventAccumulator(str(cfg.run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    records = read_metrics(cfg.run_dir)
    keys = {k for r in records for k in r} - {"step"}
    assert set(acc.Tags()["scalars"]) == keys
    for key in keys:
        want = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        for (_, g), (_, w) in zip(got, want, strict=True):
            assert g == pytest.approx(w, rel=1e-6, abs=1e-12), key  # stored as float32
    assert acc.Tags()["images"] == ["train_batch"]
    assert len(acc.Images("train_batch")) == 1
    # The traced graph: tutorial_cnn's three convolutions are in it.
    assert acc.Tags()["graph"]
    ops = [node.op for node in acc.Graph().node]
    assert ops.count("aten::_convolution") == 3, sorted(set(ops))


def test_reader_survives_a_torn_last_record(trained, tmp_path):
    cfg, _ = trained
    source = next(offline_dirs(cfg)[0].glob("*.wandb"))
    whole = list(wandb_reader.records(source))
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(source.read_bytes()[:-5])  # a job killed mid-write
    assert len(list(wandb_reader.records(torn))) == len(whole) - 1
    bad = bytearray(source.read_bytes())
    bad[20] ^= 0xFF  # inside the first record
    torn.write_bytes(bytes(bad))
    with pytest.raises(wandb_reader.CorruptFile):
        list(wandb_reader.records(torn))


def test_disabled_writes_nothing(tmp_path):
    cfg = load(tmp_path, "run.name=quiet", "log.wandb.mode=disabled", "log.tensorboard=false")
    run = Run(cfg, Env(), total_steps=4)
    assert not run.wants_images  # no sink takes images: the engine never copies a batch
    run.log({"step": 2, "epoch": 0.5, "loss": 1.0})
    run.summary({"steps": 2})
    run.close()
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == [
        "config.yaml", "metrics.jsonl", "summary.json",
    ]  # fmt: skip


def test_auto_without_credentials_goes_offline(tmp_path, no_credentials):
    assert wandb_sink.resolve_mode("auto") == "offline"
    cfg = load(tmp_path, "run.name=auto", "log.wandb.mode=auto", "log.tensorboard=false")
    run = Run(cfg, Env(), total_steps=4)
    run.log({"step": 1, "epoch": 0.25, "loss": 0.5})
    run.close()
    (offline,) = offline_dirs(cfg)
    assert [r["loss"] for r in wandb_reader.history(offline) if "loss" in r] == [0.5]
    assert not (no_credentials / ".netrc").exists()  # nothing prompted, nothing written


def test_auto_sees_credentials(no_credentials, monkeypatch):
    (no_credentials / ".netrc").write_text("machine example.org login x password y\n")
    assert wandb_sink.resolve_mode("auto") == "offline"  # another host's entry is no login
    (no_credentials / ".netrc").write_text("machine api.wandb.ai login user password k\n")
    assert wandb_sink.resolve_mode("auto") == "online"
    (no_credentials / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_sink.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment overrides auto
    assert wandb_sink.resolve_mode("auto") == "offline"
    assert wandb_sink.resolve_mode("disabled") == "disabled"


@pytest.mark.timeout(60)
def test_online_without_a_reachable_server_logs_offline(
    tmp_path, no_credentials, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = load(tmp_path, "run.name=cut_off", "log.wandb.mode=auto", "log.tensorboard=false",
               "log.wandb.init_timeout_s=1", "log.progress=lines")  # fmt: skip
    run = Run(cfg, Env(), total_steps=4)
    run.log({"step": 1, "epoch": 0.25, "loss": 0.5})
    run.close()
    (offline,) = offline_dirs(cfg)
    assert [r["loss"] for r in wandb_reader.history(offline) if "loss" in r] == [0.5]
    assert "W&B offline (server unreachable" in capsys.readouterr().out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault, exit_code", [("raise", 1), ("kill", -signal.SIGKILL)])
def test_resume_continues_the_same_wandb_run_with_monotonic_steps(
    tmp_path, no_credentials, fault, exit_code
):
    """A real job dies in step 7 (step 6 logged, the last checkpoint at step 4) and resumes
    there in the same W&B run; no step W&B holds is sent twice and every later one is sent.
    raise: the job's W&B run closes cleanly, holding steps 0-6, so 6 is held back. kill
    (SIGKILL): W&B's service dies with the job before writing what it held, so the resumed
    job sends those steps again."""
    common = ["run.name=requeued", "ckpt.every_steps=4", "ckpt.epoch_end=false", "ckpt.keep=5",
              "train.max_steps=12"]  # fmt: skip
    args = ["-m", "distnn.train", f"run.dir={tmp_path}", *FAST, *SMALL, *common]
    died = run_cli(*args, env={"DISTNN_FAULT": f"{fault}@step:7,rank:0"}, timeout=120)
    assert died.returncode == exit_code, died.stderr[-2000:]
    second = load(tmp_path, *common)
    assert not (second.run_dir / "summary.json").exists()
    train(second)

    parts = offline_dirs(second)
    assert len(parts) == 2
    run_id = (second.run_dir / "wandb_id").read_text().strip()
    assert [p.name.rsplit("-", 1)[-1] for p in parts] == [run_id, run_id]
    assert wandb_reader.run_info(parts[1])["id"] == run_id
    steps = [[r["_step"] for r in wandb_reader.history(p)] for p in parts]
    if fault == "raise":
        assert wandb_reader.run_info(parts[0])["id"] == run_id
        assert steps[0] == [0, 2, 4, 6]  # 0: the image grid
    # (killed: the file may hold nothing at all, not even its run record: seen on an idle
    # machine, where the service had written nothing in 7 steps)
    assert set(steps[0]) <= {0, 2, 4, 6}
    held = max(steps[0], default=-1)
    assert steps[1] == [s for s in (6, 8, 10, 12) if s > held]
    combined = steps[0] + steps[1]
    assert combined == sorted(set(combined))
    # metrics.jsonl drops the first attempt's step 6 on resume; TensorBoard hides it: each
    # step shows once in both.
    assert [r["step"] for r in read_metrics(second.run_dir) if "loss" in r] == [
        2, 4, 6, 8, 10, 12,
    ]  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(second.run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6, 8, 10, 12]

    # A fresh start (nothing to resume) is a new W&B run.
    shutil.rmtree(second.run_dir / "checkpoints")
    third = load(tmp_path, *common[:-1], "train.max_steps=2")
    train(third)
    assert (third.run_dir / "wandb_id").read_text().strip() != run_id


def test_non_zero_rank_writes_nothing(tmp_path):
    cfg = load(tmp_path, "run.name=rank1")
    run = Run(cfg, Env(rank=1, world_size=2), total_steps=4)
    assert not run.wants_images and not run.sinks
    run.log({"step": 1, "epoch": 0.1, "loss": 1.0})
    run.summary({"steps": 1})
    run.close()
    assert not cfg.run_dir.exists()


@pytest.mark.timeout(180)
def test_only_rank_0_writes_in_a_two_process_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = run_cli(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "distnn.train", f"run.dir={tmp_path / 'runs'}", "run.name=ddp", *FAST, *SMALL,
        "train.max_steps=4", "log.wandb.mode=offline", "log.tensorboard=true",
        timeout=170, cwd=tmp_path, env={"HOME": str(home)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*/*.wandb"))) == 1
    assert len(list((run_dir / "tb").iterdir())) == 1  # one event file
    # Nothing else anywhere: no second run, no ./wandb or ./runs from a rank that guessed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".ddp.lock", "ddp"]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    rows = [r for r in wandb_reader.history(offline) if "loss" in r]
    assert [r["_step"] for r in rows] == [2, 4]
    assert rows[-1]["images_per_sec"] == pytest.approx(2 * rows[-1]["images_per_sec_per_device"])
    assert r.stdout.count("W&B offline") == 1  # one note, from rank 0


# --- FLOPs and MFU ---------------------------------------------------------------------------


def small_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 16×16 output
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),  # 8×8 output
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_flop_counter_counts_a_small_conv_net():
    # A multiply-add is 2 FLOPs: conv = 2 × H_out × W_out × C_out × C_in × k²; linear = 2 × in
    # × out. Norms, activations, pooling and biases are not counted (the usual MFU convention).
    conv1 = 2 * 16 * 16 * 8 * 3 * 3 * 3
    conv2 = 2 * 8 * 8 * 16 * 8 * 3 * 3
    fc = 2 * 16 * 10
    per_image = conv1 + conv2 + fc  # 258,368
    model = small_convnet()
    running_mean = model[1].running_mean.clone()
    assert tp.count_flops(model, torch.zeros(4, 3, 16, 16)) == pytest.approx(4 * per_image, 0.01)
    assert tp.train_flops_per_image(model, 16, torch.device("cpu")) == pytest.approx(
        3 * per_image, rel=0.01
    )
    assert model.training and torch.equal(model[1].running_mean, running_mean)  # untouched


def test_peak_table_and_mfu():
    assert tp.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert tp.peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert tp.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert tp.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert tp.peak_flops("NVIDIA H100 NVL") == 835e12
    assert tp.peak_flops("NVIDIA H200") == 989e12
    assert tp.peak_flops("NVIDIA H200 NVL") == 835e12
    assert tp.peak_flops("NVIDIA GeForce RTX 4090") is None  # unknown: no MFU, not a guess
    meter = tp.Throughput(torch.device("cpu"), flops_per_image=3e9, peak=989e12)
    meter.add(256)
    out = meter.read()
    achieved = out["images_per_sec_per_device"] * 3e9
    assert out["tflops_per_device"] == pytest.approx(achieved / 1e12)
    assert out["mfu"] == pytest.approx(achieved / 989e12)
    assert out["memory_gib"] > 0.01  # this process's RSS
    bare = tp.Throughput(torch.device("cpu"), flops_per_image=3e9).read()
    assert "mfu" not in bare and "tflops_per_device" in bare
    cpu = tp.Throughput.for_model(small_convnet(), 16, torch.device("cpu")).read()
    assert "mfu" not in cpu and "tflops_per_device" not in cpu and math.isfinite(cpu["memory_gib"])


def test_console_bar_and_lines(capsys, monkeypatch):
    """On a terminal a rich bar tracks step/total with loss, lr and img/s; elsewhere (auto,
    not a TTY) one plain line per record with an ETA."""
    from distnn.monitor import console

    record = {"step": 5, "epoch": 0.5, "loss": 0.25, "lr": 0.01, "images_per_sec": 1234.0}
    bar = console.build("bar", total_steps=10, start_step=2)
    assert isinstance(bar, console.BarConsole)
    assert bar.progress.tasks[0].completed == 2  # resumed at step 2
    bar.log(record)
    task = bar.progress.tasks[0]
    assert (task.completed, task.total) == (5, 10)
    assert task.fields["info"] == "epoch 0.50  loss 0.2500  lr 0.01  img/s 1,234"
    bar.close()
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    lines = console.build("auto", total_steps=10, start_step=0)
    assert isinstance(lines, console.LineConsole)
    lines.log(record)
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("step 5/10  epoch 0.50  loss 0.2500  lr 0.01  img/s 1,234  eta ")
