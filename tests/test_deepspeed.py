"""DeepSpeed ZeRO behind the Strategy interface: real engines on 2 torchrun processes (gloo,
DeepSpeed's CPU accelerator), compared with DDP on the same data and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distnn import models
from distnn.checkpoint import main as checkpoint_main
from distnn.errors import UserError
from distnn.monitor import read_metrics
from distnn.parallel import deepspeed_config
from distnn.parallel.deepspeed import build_ops
from distnn.predict import main as predict
from distnn.train import main as train_main
from distnn.train import train
from tests.cluster import free_port
from tests.conftest import (
    EQUIVALENCE,
    FAST,
    ROOT,
    assert_same_params,
    final_ema,
    final_weights,
    last_eval,
    logged_steps,
    losses,
    one_line_error,
    run_cli,
    shared,
    shared_run,
    shared_stdout,
    two_ranks,
)

pytest.importorskip("deepspeed")

# conftest's 2-rank runs: 10 steps of global batch 16 on tutorial_cnn, fp32, SGD, an EMA.
COMMON = EQUIVALENCE
ZERO = ["strategy.name=deepspeed"]
ZERO3 = ["train.batch_size=8", *ZERO, "strategy.deepspeed.zero_stage=3", "ckpt.every_steps=4"]


def launch(root: Path, name: str, *overrides: str, restarts: int = 0, env: dict | None = None):
    return root / name, two_ranks(root / name, *overrides, restarts=restarts, env=env)


def grad_norms(run_dir: Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    # `make setup` compiles DeepSpeed's ops; without it the first engine would, inside a
    # test's timeout: build (or find) them here.
    build_ops(strict=True)
    return tmp_path_factory.mktemp("ds")


@pytest.fixture(scope="module")
def zero3(root, tmp_path_factory) -> Path:
    """ZeRO-3 on 2 ranks × 8 with checkpoints every 4 steps: DDP's equal, and what a crashed
    and restarted run must reproduce."""
    return shared(tmp_path_factory, "zero3", lambda path: two_ranks(path, *ZERO3).stdout)


def assert_equals_ddp(run_dir: Path, ddp: Path) -> None:
    assert len(losses(run_dir)) == 10
    assert losses(run_dir) == pytest.approx(losses(ddp), rel=1e-4)
    assert_same_params(final_weights(run_dir), final_weights(ddp), rtol=1e-4)
    # The EMA, averaged over each rank's part of the weights (ZeRO-3: its partitions, merged
    # for export), and evaluated by swapping it in (on the uneven split of EQUIVALENCE).
    assert_same_params(final_ema(run_dir), final_ema(ddp), rtol=1e-4)
    ema, ddp_ema = last_eval(run_dir), last_eval(ddp)
    assert ema["val_loss_ema"] == pytest.approx(ddp_ema["val_loss_ema"], rel=1e-4)
    # The EMA was swapped in: its loss is not the model's, by far more than ZeRO's and DDP's
    # differ (measured: 2.1e-4 apart after 10 steps; ZeRO and DDP within 1e-8).
    noise = abs(ema["val_loss_ema"] - ddp_ema["val_loss_ema"])
    assert abs(ema["val_loss_ema"] - ema["val_loss"]) > 10 * noise


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [0, 1, 3])  # 2: test_zero2_as_srun_tasks_matches_ddp
def test_zero_stage_matches_ddp(root, ddp_reference, tmp_path, stage, request):
    if stage == 3:  # the session's ZeRO-3 run, which test_zero3_crash_... reproduces too
        run_dir = request.getfixturevalue("zero3")
        out = shared_stdout(run_dir)
    else:
        if stage == 1:  # stage 1 comes from a user's JSON, its "auto" values filled by distnn
            ds = tmp_path / "ds.json"
            ds.write_text(json.dumps({
                "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                "zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"},
            }))  # fmt: skip
            args = [f"strategy.deepspeed.ds_config={ds}"]
        else:
            args = [f"strategy.deepspeed.zero_stage={stage}"]
        run_dir, r = launch(root, f"zero{stage}", "train.batch_size=8", *ZERO, *args)
        out = r.stdout
    assert f"strategy: deepspeed ZeRO-{stage}, optimizer SGD, schedule distnn's" in out
    assert_equals_ddp(run_dir, ddp_reference)


@pytest.mark.timeout(300)
def test_zero2_as_srun_tasks_matches_ddp(root, ddp_reference):
    """ZeRO-2 (the default stage) in two processes started the way srun starts them:
    SLURM_PROCID/NTASKS/LOCALID and no LOCAL_RANK, RANK or WORLD_SIZE (DeepSpeed asserts
    LOCAL_RANK itself)."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
             "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # channels_last too: DeepSpeed keeps the weights NCHW (it views parameters as bytes).
    args = ["-m", "distnn.train", f"run.dir={root}", "run.name=srun", *COMMON,
            "train.batch_size=8", *ZERO, "model.channels_last=true"]  # fmt: skip

    def task(i: int) -> subprocess.Popen:
        env = {**base, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    tasks = [task(0), task(1)]
    outputs = [t.communicate(timeout=240) for t in tasks]
    for t, (_, err) in zip(tasks, outputs, strict=True):
        assert t.returncode == 0, err[-3000:]
    out = outputs[0][0]
    assert "strategy: deepspeed ZeRO-2, optimizer SGD, schedule distnn's" in out
    assert "2 process(es)" in out
    assert "weights NCHW (model.channels_last: inputs only)" in out
    assert_equals_ddp(root / "srun", ddp_reference)


# AdamW with warmup and cosine: the schedule a ds_config optimizer must follow too.
SCHEDULE = ["optim.name=adamw", "optim.lr=0.001", "sched.warmup_steps=4", "train.max_steps=12",
            "train.batch_size=16"]  # fmt: skip


@pytest.fixture(scope="module")
def alone(root, tmp_path_factory) -> Path:
    """python -m distnn.train alone (no launcher, no LOCAL_RANK) with ZeRO-2."""

    def command(path: Path) -> list[str]:
        return ["-m", "distnn.train", f"run.dir={path.parent}", f"run.name={path.name}", *COMMON,
                *SCHEDULE, *ZERO]  # fmt: skip

    run_dir = shared_run(tmp_path_factory, "alone", command)
    out = shared_stdout(run_dir)
    assert "deepspeed ZeRO-2, optimizer AdamW, schedule distnn's sched.*" in out
    assert "1 process(es)" in out
    return run_dir


@pytest.mark.timeout(300)
def test_zero2_one_process_without_a_launcher(alone, make_cfg):
    """One process of ZeRO-2 trains as the plain process does."""
    plain = make_cfg("run.name=plain", *COMMON, *SCHEDULE)
    train(plain)
    assert logged_steps(alone) == list(range(1, 13))
    assert losses(alone) == pytest.approx(losses(plain.run_dir), rel=1e-4)
    assert_same_params(final_weights(alone), final_weights(plain.run_dir), rtol=1e-4)


def lrs(run_dir: Path) -> list[float]:
    return [r["lr"] for r in read_metrics(run_dir) if "lr" in r]


@pytest.mark.timeout(300)
def test_ds_config_optimizer_follows_distnn_schedule(root, alone, tmp_path):
    """A ds_config "optimizer" section: DeepSpeed builds the optimizer, distnn's warmup and
    cosine still drive its LR, step for step as without one; a "scheduler" section instead
    replaces distnn's schedule, and the run log says so."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        "zero_optimization": {"stage": 2},
    }))  # fmt: skip
    r = run_cli("-m", "distnn.train", f"run.dir={root}", "run.name=lr_theirs", *COMMON,
                *SCHEDULE, *ZERO, f"strategy.deepspeed.ds_config={ds}", timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "optimizer AdamW (ds_config), schedule distnn's sched.*" in r.stdout
    ours, theirs = lrs(alone), lrs(root / "lr_theirs")
    assert len(theirs) == 12 and theirs == pytest.approx(ours, rel=1e-9)
    # Logged after each step: the LR of the next one, warmup 2/4, 3/4, 4/4, then cosine.
    assert ours[:3] == pytest.approx([0.0005, 0.00075, 0.001])
    assert ours[-1] < 0.05 * max(ours)

    ds.write_text(json.dumps({
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2,
                                                     "warmup_max_lr": 0.002}},
    }))  # fmt: skip
    r = run_cli("-m", "distnn.train", f"run.dir={root}", "run.name=lr_ds", *COMMON, *SCHEDULE,
                *ZERO, f"strategy.deepspeed.ds_config={ds}", timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "schedule WarmupLR (ds_config; sched.* off)" in r.stdout
    assert lrs(root / "lr_ds")[-1] == pytest.approx(0.002)  # WarmupLR holds: no cosine on top


@pytest.mark.timeout(600)
def test_zero2_accumulation_matches_ddp(root, ddp_reference):
    # 2 ranks × 2 micro-batches of 4: the same global batch of 16 as DDP's 2 × 8, whose
    # equivalence with DDP accumulating 2 × 4 tests/test_distributed.py shows.
    run_dir, _ = launch(root, "zero2_accum", "train.batch_size=4", "train.accum_steps=2", *ZERO)
    assert losses(run_dir) == pytest.approx(losses(ddp_reference), rel=1e-4)
    assert_same_params(final_weights(run_dir), final_weights(ddp_reference), rtol=1e-4)


@pytest.mark.timeout(600)
def test_zero2_bf16_learns(root):
    # bf16 is emulated on CPUs without avx512_bf16: 16 px keeps it short.
    run_dir, _ = launch(root, "bf16", *ZERO, "precision=bf16", "train.max_steps=48",
                        "train.batch_size=16", "data.image_size=16", "data.synthetic_train=512",
                        "data.synthetic_val=256", "optim.lr=0.1", "train.log_every=4")  # fmt: skip
    records = read_metrics(run_dir)
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < 0.85 * train_losses[0]
    assert records[-1]["val_top1"] >= 0.3  # chance is 0.1
    # The consolidated weights are fp32 masters, not the bf16 copies the engine computed with.
    assert all(v.dtype == torch.float32 for v in final_weights(run_dir).values())


@pytest.mark.timeout(600)
def test_zero2_optimizer_offload_uses_cpu_adam_and_matches_adamw(root, make_cfg):
    # A weight decay large enough to show (10 steps at lr 0.003 shrink the weights ~3 %, far
    # above the tolerance below): a dropped or coupled (L2) decay would not match AdamW's.
    adamw = ["optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=1.0"]
    run_dir, r = launch(root, "offload", "train.batch_size=8", *ZERO, *adamw,
                        "strategy.deepspeed.offload_optimizer=cpu")  # fmt: skip
    assert "ZeRO-2 (offload_optimizer to cpu), optimizer DeepSpeedCPUAdam" in r.stdout
    # One process with the global batch is what DDP computes (tests/test_distributed.py).
    ref = make_cfg("run.name=adamw", *COMMON, *adamw, "train.batch_size=16")
    train(ref)
    assert losses(run_dir) == pytest.approx(losses(ref.run_dir), rel=1e-5)
    # Adam's step is blind to a uniform scale of the gradients; their norm is not.
    assert grad_norms(run_dir) == pytest.approx(grad_norms(ref.run_dir), rel=1e-4)
    assert len(grad_norms(run_dir)) == 10
    # Adam divides by sqrt(v): for near-zero gradients the last bits of DeepSpeedCPUAdam's
    # vectorised arithmetic show in a few elements (seen: 2 of 65536 off by 1.3e-4). Each
    # tensor's norm must match closely: a dropped decay changes it by ~3 %.
    got, want = final_weights(run_dir), final_weights(ref.run_dir)
    torch.testing.assert_close(got, dict(want), rtol=1e-4, atol=3e-4)
    for k in want:
        assert got[k].norm().item() == pytest.approx(want[k].norm().item(), rel=1e-5), k


@pytest.mark.timeout(600)
def test_zero3_crash_resume_matches_uninterrupted_then_exports(root, zero3, tmp_path, capfd):
    whole = zero3
    # Rank 1 dies after step 6; torchrun restarts the group, which resumes from step 4.
    run_dir, r = launch(root, "zero3_crash", *ZERO3, restarts=1,
                        env={"DISTNN_FAULT": "crash@step:6,rank:1"})  # fmt: skip
    assert "resumed at step 4" in r.stdout
    assert logged_steps(run_dir) == list(range(1, 11))
    assert losses(run_dir) == pytest.approx(losses(whole), rel=1e-6)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best", "latest", "step_00000004", "step_00000008", "step_00000010",
    ]  # fmt: skip
    assert (checkpoints / "latest").read_text().strip() == "step_00000010"
    assert not list(checkpoints.glob(".*"))  # no temporary directory left behind
    assert_same_params(final_weights(run_dir), final_weights(whole), rtol=1e-6)

    # DeepSpeed's files are pickles that only an unpickler which runs code reads: from outside
    # the run (export, predict) they need the user's --trust; the run itself resumed above.
    out = tmp_path / "model.safetensors"
    refused = one_line_error(checkpoint_main, ["export", str(run_dir), str(out)], capfd)
    assert "a DeepSpeed checkpoint directory" in refused and "--trust" in refused, refused
    e = run_cli("-m", "distnn.checkpoint", "export", str(run_dir), str(out), "--trust")
    assert e.returncode == 0, e.stderr
    model = models.build("tutorial_cnn", 10, 32)
    model.load_state_dict(load_file(out), strict=True)
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(img)
    assert predict(["--checkpoint", str(out), str(img)]) == predict(
        ["--checkpoint", str(run_dir), "--trust", str(img)]
    )
    # ZeRO shards belong to the world size that wrote them: one process cannot continue.
    argv = [f"run.dir={root}", "run.name=zero3_crash", *COMMON, *ZERO3, "train.max_steps=12"]
    err = one_line_error(train_main, argv, capfd)
    assert "deepspeed shards of processes=2, this run has 1: they load only at" in err


@pytest.mark.timeout(300)
def test_deepspeed_launcher_runs_the_same_command(root):
    # It appends --local_rank=N to the arguments and sets RANK/WORLD_SIZE like torchrun.
    r = run_cli(str(Path(sys.executable).parent / "deepspeed"), "--num_gpus=2",
                "--master_port=29731", "--module", "distnn.train", f"run.dir={root}",
                "run.name=launcher", *COMMON, "train.max_steps=4", *ZERO, timeout=280)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((root / "launcher" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4


@pytest.mark.timeout(300)
def test_ops_are_not_rebuilt_whichever_ninja_path_finds_first(root):
    """A job whose PATH starts with the venv's bin/ (the sbatch scripts) and one whose PATH
    does not (`.venv/bin/python -m ...`) load the ops `make setup` built: ninja 1.11 (the
    system's) and 1.13 (the venv's) each rebuilt what the other had (1-2 minutes here)."""
    built = sorted(Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/*.so"))  # by the fixture
    assert built
    before = {p: p.stat().st_mtime_ns for p in built}
    venv_bin = str(Path(sys.executable).parent)
    system_path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d != venv_bin)
    for path in (f"{venv_bin}{os.pathsep}{system_path}", system_path):
        r = run_cli("-c", "from distnn.parallel.deepspeed import build_ops; build_ops(True)",
                    env={"PATH": path}, timeout=280)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert {p: p.stat().st_mtime_ns for p in built} == before, f"rebuilt with PATH={path}"


def test_generated_config_follows_distnn(make_cfg):
    cfg = make_cfg("strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3",
                   "train.batch_size=8", "train.accum_steps=4", "precision=bf16",
                   "train.clip_grad_norm=1.5", "strategy.deepspeed.offload_param=cpu",
                   "strategy.deepspeed.offload_optimizer=cpu")  # fmt: skip
    ds = deepspeed_config.build(cfg, world_size=4)
    assert ds["train_batch_size"] == 8 * 4 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["managed_gradient_accumulation"] is False
    assert ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_user_config_auto_values_and_conflicts(make_cfg, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({
        "train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"},
        "bf16": {"enabled": "auto"}, "optimizer": {"type": "Adam", "params": {"lr": "auto"}},
    }))  # fmt: skip
    common = ["strategy.name=deepspeed", "train.accum_steps=2",
              "strategy.deepspeed.reduce_bucket_size=7",
              f"strategy.deepspeed.ds_config={user}"]  # fmt: skip
    ds = deepspeed_config.build(make_cfg(*common, "train.batch_size=8"), world_size=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"]["stage"] == 3  # the user's explicit value wins
    assert ds["zero_optimization"]["reduce_bucket_size"] == 7  # "auto": distnn's
    assert ds["zero_optimization"]["contiguous_gradients"] is True  # unset: distnn's
    assert ds["bf16"] == {"enabled": False}
    # DeepSpeed's own optimizer, its "auto" hyperparameters distnn's (lr: the peak LR)
    assert ds["optimizer"] == {
        "type": "Adam",
        "params": {"lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 5e-4},
    }
    with pytest.raises(UserError, match=r"scheduler.params.x='auto' but distnn has no value"):
        deepspeed_config.merge(ds, {"scheduler": {"params": {"x": "auto"}}})
    with pytest.raises(UserError, match=r"train_batch_size=32.*gives 48"):
        deepspeed_config.build(make_cfg(*common, "train.batch_size=12"), world_size=2)


def test_conflicting_batch_size_is_one_line_before_any_process_group(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 256, "train_micro_batch_size_per_gpu": "auto"}))
    r = run_cli("-m", "distnn.train", f"run.dir={tmp_path}", *FAST, "train.batch_size=32",
                "strategy.name=deepspeed", f"strategy.deepspeed.ds_config={ds}")  # fmt: skip
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "train_batch_size=256" in err and "gives 32" in err
    assert not (tmp_path / "default").exists()


@pytest.mark.parametrize(
    ("overrides", "user_json", "expected"),
    [
        (["strategy.deepspeed.zero_stage=1", "strategy.deepspeed.overlap_comm=true"], None,
         "strategy.deepspeed.overlap_comm=true needs strategy.deepspeed.zero_stage 2 or 3 (got 1)"),
        ([], {"bf16": {"enabled": True}, "fp16": {"enabled": True}},
         "DeepSpeed refuses the config built from strategy.*: AssertionError: bfloat16 and fp16"),
        (["optim.head_lr_scale=10"], {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
         "optim.head_lr_scale needs distnn's optimizer; the ds_config names DeepSpeed's (AdamW)"),
        (["optim.layer_decay=0.7"], {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
         "optim.layer_decay needs distnn's optimizer; the ds_config names DeepSpeed's (AdamW)"),
    ],
)  # fmt: skip
def test_deepspeed_refusals_are_one_line_before_any_process_group(
    tmp_path, capfd, overrides, user_json, expected
):
    """What DeepSpeed would stop with a bare AssertionError on every rank, after the group.
    (In this process: the test above starts one, DeepSpeed's imports included.)"""
    if user_json is not None:
        (tmp_path / "ds.json").write_text(json.dumps(user_json))
        overrides = [*overrides, f"strategy.deepspeed.ds_config={tmp_path / 'ds.json'}"]
    argv = [f"run.dir={tmp_path}", *FAST, "strategy.name=deepspeed", *overrides]
    assert expected in one_line_error(train_main, argv, capfd)
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "default").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["strategy.deepspeed.offload_param=cpu"], "needs strategy.deepspeed.zero_stage=3"),
        (
            ["strategy.deepspeed.zero_stage=0", "strategy.deepspeed.offload_optimizer=cpu"],
            "zero_stage 1, 2 or 3",
        ),
        (["train.nonfinite=skip"], "train.nonfinite=raise"),
        (["strategy.deepspeed.ds_config=/nonexistent.json"], "/nonexistent.json"),
        (
            ["strategy.deepspeed.zero_stage=1", "strategy.deepspeed.overlap_comm=true"],
            "overlap_comm=true needs",
        ),
        (
            ["strategy.deepspeed.zero_stage=0", "strategy.deepspeed.overlap_comm=true"],
            "overlap_comm=true needs",
        ),
        (["strategy.deepspeed.zero_stage=3", "log.tensorboard_graph=true"], "tensorboard_graph"),
        (["optim.name=lars"], "optim.name=lars is not available with strategy.name=deepspeed"),
    ],
)
def test_unsupported_combinations_are_refused(make_cfg, overrides, expected):
    from distnn import parallel
    from distnn.parallel.env import Env
    from distnn.precision import build

    cfg = make_cfg("strategy.name=deepspeed", *overrides)
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match=expected):
        parallel.build(cfg, Env(), cpu, build("fp32", cpu))
