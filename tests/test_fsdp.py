"""FSDP2 (strategy.name=fsdp) on real torchrun processes over gloo: the same training as DDP,
evaluation in lockstep, checkpoints that every other tool reads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from distnn import checkpoint, config, data, models
from distnn.monitor import read_metrics
from distnn.parallel.env import Env
from distnn.precision import cpu_has_bf16
from distnn.predict import main as predict
from distnn.train import train
from tests import user_package
from tests.conftest import (
    FAST,
    ROOT,
    assert_same_params,
    final_ema,
    final_weights,
    last_eval,
    losses,
    run_cli,
    shared,
    shared_stdout,
    torchrun,
)
from tests.conftest import two_ranks as launch


def two_ranks(run_dir, *args: str, timeout: float = 240) -> str:
    return launch(run_dir, "log.progress=lines", *args, timeout=timeout).stdout


def assert_same_run(run_dir, reference, rtol: float = 1e-5, evals: bool = True) -> None:
    assert losses(run_dir) == pytest.approx(losses(reference), rel=rtol)
    assert len(losses(run_dir)) == 10
    assert_same_params(final_weights(run_dir), final_weights(reference), rtol, atol=rtol / 10)
    # The EMA of each rank's shards, merged from the DCP checkpoint, and evaluated sharded.
    assert_same_params(final_ema(run_dir), final_ema(reference), rtol, atol=rtol / 10)
    if evals:
        ema = last_eval(run_dir)["val_loss_ema"]
        assert ema == pytest.approx(last_eval(reference)["val_loss_ema"], rel=rtol)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """FSDP on 2 ranks × 8, once in the session (conftest.shared)."""

    def build(path):
        return two_ranks(path, "strategy.name=fsdp", "train.batch_size=8")

    return shared(tmp_path_factory, "fsdp_2x8", build)


@pytest.mark.timeout(300)
def test_fsdp_equals_ddp(fsdp, ddp_reference):
    out = shared_stdout(fsdp)
    assert "strategy: fsdp over gloo, 2 processes, 2 blocks (Sequential) + root" in out
    assert_same_run(fsdp, ddp_reference)


@pytest.mark.timeout(300)
def test_fsdp_accumulating_two_micro_batches_equals_ddp(tmp_path, ddp_reference):
    """2 ranks × 2 accumulated micro-batches of 4: DDP's 2 × 8 (DDP accumulating equals DDP
    not accumulating: tests/test_distributed.py). Non-final micro-batches keep their
    gradients local, as DDP's no_sync does."""
    two_ranks(tmp_path / "accum", "strategy.name=fsdp", "train.batch_size=4", "train.accum_steps=2")
    assert_same_run(tmp_path / "accum", ddp_reference)


@pytest.mark.timeout(400)
def test_fsdp_shards_resnet18_blocks_and_equals_ddp(tmp_path):
    """Rank 0's weights and BatchNorm statistics (its own batches in both) after 10 steps of
    2 accumulated micro-batches."""
    net = ["model.name=resnet18", "data.image_size=16", "data.synthetic_val=16",
           "train.batch_size=4", "train.accum_steps=2"]  # fmt: skip
    two_ranks(tmp_path / "ddp", *net, "strategy.name=ddp", timeout=360)
    out = two_ranks(tmp_path / "fsdp", *net, "strategy.name=fsdp", timeout=360)
    assert "8 blocks (BasicBlock) + root" in out
    # Evaluation uses each rank's own BatchNorm statistics (and their EMA), which differ: DDP
    # overwrites rank 1's with rank 0's before every training forward, FSDP does not. The
    # weights, rank 0's statistics and the EMA that checkpoints hold (rank 0's) are compared.
    assert_same_run(tmp_path / "fsdp", tmp_path / "ddp", evals=False)


@pytest.mark.timeout(300)
def test_fsdp_evaluates_an_uneven_split_in_lockstep(fsdp):
    """513 samples, batch 8, 2 ranks: 33 batches on rank 0, 32 on rank 1, whose sharded
    forwards must still meet rank 0's last. Every sample counts once: the logged val_loss is
    one process's loss over all 513 with the run's final weights."""
    run_dir = fsdp
    logged = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]
    cfg = config.load(run_dir / "config.yaml", ["data.workers=0"])
    loaders = data.build(cfg, Env())
    assert loaders.val_size == 513
    model = models.build(cfg.model.name, 10, cfg.data.image_size)
    model.load_state_dict(final_weights(run_dir))
    mean = torch.tensor(loaders.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaders.std).view(1, 3, 1, 1)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loaders.val:
            logits = model.eval()((x.float() - mean) / std)
            total += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
    assert n == 513
    assert logged == pytest.approx(total / n, rel=1e-5)


@pytest.mark.timeout(300)
def test_fsdp_checkpoint_exports_predicts_initialises_and_resumes_on_one_rank(tmp_path, capsys):
    """Each rank writes its own shards (DCP); export merges them; a checkpoint cut short is
    skipped with a warning; the shards load on one process."""
    run_dir = tmp_path / "fs"
    two_ranks(run_dir, "strategy.name=fsdp", "train.batch_size=16", "train.max_steps=6",
              "ckpt.every_steps=2")  # fmt: skip
    step6 = run_dir / "checkpoints" / "step_00000006"
    shards = sorted(p.stat().st_size for p in step6.glob("*.distcp"))
    assert len(shards) == 2 and shards[0] > 0.4 * sum(shards), shards  # no gather to rank 0
    assert (step6 / ".metadata").is_file() and (step6 / "state.pt").is_file()
    # DCP's shards and .metadata read safely: no --trust needed from outside the run.
    r = run_cli("-m", "distnn.checkpoint", "export", str(run_dir), str(tmp_path / "m.safetensors"))
    assert r.returncode == 0, r.stderr
    checkpoint.main(["export", "--weights", "ema", str(run_dir), str(tmp_path / "ema.safetensors")])
    ema = load_file(tmp_path / "ema.safetensors")
    model = models.build("tutorial_cnn", 10, 32)
    model.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (20, 200, 90)).save(tmp_path / "x.png")
    capsys.readouterr()
    predict(["--checkpoint", str(run_dir), str(tmp_path / "x.png")])
    assert "x.png: class_" in capsys.readouterr().out
    cfg = config.load(None, [*FAST, f"model.init_from={run_dir}"])
    started, _, _ = models.prepare(cfg, 10, torch.device("cpu"))
    assert_same_params(started.state_dict(), model.state_dict(), rtol=0, atol=0)

    # Rank 1's shard of step 6 cut short: the run goes back to step 4, on one process without
    # FSDP (the shards load into the plain model; the global batch is kept), and ends where the
    # two-rank run ended.
    with open(step6 / "__1_0.distcp", "r+b") as f:
        f.truncate(100)
    resumed = config.load(run_dir / "config.yaml", ["strategy.name=single", "train.batch_size=32"])
    with pytest.warns(UserWarning, match=r"step_00000006.*incomplete: __1_0.distcp has 100 of"):
        assert train(resumed)["steps"] == 6
    assert "resumed at step 4" in capsys.readouterr().out
    assert_same_params(final_weights(run_dir), model.state_dict(), rtol=1e-5, atol=1e-6)
    assert_same_params(final_ema(run_dir), ema, rtol=1e-5, atol=1e-6)  # resharded into one


@pytest.mark.timeout(300)
@pytest.mark.skipif(not cpu_has_bf16(), reason="bf16 is emulated on this CPU (77 s here, 25x fp32)")
def test_fsdp_bf16_mixed_precision_learns(tmp_path):
    """bf16 parameters in forward and backward, fp32 gradient reduction and fp32 master
    weights (what the checkpoint holds)."""
    run_dir = tmp_path / "bf16"
    out = two_ranks(run_dir, "strategy.name=fsdp", "train.batch_size=16", "precision=bf16",
                    "train.max_steps=30")  # fmt: skip
    assert "precision bf16, reduce fp32" in out
    curve = losses(run_dir)
    assert curve[-1] < 0.6 * curve[0]
    assert {t.dtype for t in final_weights(run_dir).values()} == {torch.float32}


@pytest.mark.timeout(300)
def test_meta_device_init_gives_every_shard_the_eager_builds_weights(tmp_path):
    """The zoo, torchvision, timm and the user's own model, with an init scheme and
    pretrained weights: built on meta, sharded, replayed shard by shard; a model that reads
    a value while it is built falls back to building whole, and says so."""
    site = user_package.write(tmp_path / "site")
    torch.manual_seed(5)
    torch.save(models.build("tutorial_cnn", 10, 32).state_dict(), tmp_path / "w.pt")
    cases = [["model.name=tutorial_cnn"], ["model.name=resnet18", "model.init=trunc_normal"],
             ["model.name=tv:resnet18"], ["model.name=timm:test_vit"],
             ["model.name=userpkg.nets:SmallNet"],
             ["model.name=tutorial_cnn", f"model.init_from={tmp_path / 'w.pt'}"],
             ["model.name=userpkg.nets:ReadsItsWeights"]]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    r = torchrun(2, "tests/scripts/meta_init.py", json.dumps(cases), env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for case in results:
        assert case["same_names"] and case["differ"] == [], case
        assert 0.4 < case["local_share"] < 0.6, case  # each rank holds about half
    *built, fallback = results
    assert all(case["on_meta"] for case in built)
    assert "initialised shard by shard" in built[0]["describe"]
    for case in built[1:3]:  # ResNet-18s: no more than their largest layers at once
        assert case["peak_bytes"] < 0.25 * case["model_bytes"], case
    assert "weights from" in " ".join(built[5]["notes"])
    assert not fallback["on_meta"] and fallback["peak_bytes"] is None
    assert any("userpkg.nets:ReadsItsWeights cannot be built on the meta device" in note
               for note in fallback["notes"])  # fmt: skip
