"""Files from elsewhere are data, never code (safeload.py): crafted files that would run a
command when unpickled, or name one to build, are refused in one line unless the user opts in."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, losses, one_line_error, run_cli, write_cifar
from PIL import Image

from distnn import checkpoint, checkpoint_files, predict, safeload, train
from distnn import data as data_lib
from distnn.errors import UserError
from distnn.models import build
from distnn.parallel import dcp

OLD_CHECKPOINT = ROOT / "tests" / "data" / "old_checkpoint" / "step_00000004.pt"
# The run that wrote OLD_CHECKPOINT with distnn as of commit bbc2ade (before the safe loader):
# its numpy RNG states are numpy arrays, which the safe loader admits by name.
OLD_RUN = [*FAST, "model.name=lenet5", "data.source=synthetic", "data.synthetic_train=64",
           "data.synthetic_val=32", "train.batch_size=16", "train.log_every=1",
           "log.tensorboard=false", "sched.name=constant"]  # fmt: skip


class Marker:
    """Unpickling this runs `touch path`: a command, as a malicious file would, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run of the old run's config: a real checkpoint to craft files from."""
    root = tmp_path_factory.mktemp("base")
    train.main([*OLD_RUN, f"run.dir={root}", "run.name=base"])
    return root / "base"


@pytest.fixture
def crafted(base_run, tmp_path) -> tuple[Path, Path]:
    """A real checkpoint with one more entry whose unpickling creates the marker file."""
    marker = tmp_path / "marker"
    state = torch.load(checkpoint_files.latest(base_run), weights_only=True)
    state["note"] = Marker(marker)
    torch.save(state, tmp_path / "crafted.pt")
    return tmp_path / "crafted.pt", marker


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def test_predict_refuses_a_crafted_checkpoint_unless_trusted(crafted, image, capfd):
    path, marker = crafted
    err = one_line_error(predict.main, ["--checkpoint", str(path), str(image)], capfd)
    assert not marker.exists()
    assert str(path) in err and "system" in err and "--trust" in err, err
    predict.main(["--checkpoint", str(path), "--trust", str(image)])
    assert marker.exists()  # the user's choice: the opt-in is what lets it run


def test_export_refuses_a_crafted_checkpoint_unless_trusted(crafted, tmp_path, capfd):
    path, marker = crafted
    out = tmp_path / "m.safetensors"
    err = one_line_error(checkpoint.main, ["export", str(path), str(out)], capfd)
    assert not marker.exists() and not out.exists() and "--trust" in err, err
    checkpoint.main(["export", str(path), str(out), "--trust"])
    assert marker.exists() and out.is_file()


def test_resume_from_a_crafted_path_needs_resume_trusted(crafted, tmp_path, capfd):
    path, marker = crafted
    args = [*OLD_RUN, f"run.dir={tmp_path}", "run.name=r", f"ckpt.resume={path}", "train.epochs=2"]
    err = one_line_error(train.main, args, capfd)
    assert not marker.exists() and "ckpt.resume_trusted=true" in err, err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    train.main([*args, "ckpt.resume_trusted=true"])
    assert marker.exists()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 8


def test_init_from_a_crafted_file_needs_init_from_trusted(crafted, tmp_path, capfd):
    path, marker = crafted
    args = [*OLD_RUN, f"run.dir={tmp_path}", "run.name=i", f"model.init_from={path}"]
    err = one_line_error(train.main, args, capfd)
    assert not marker.exists() and "model.init_from_trusted=true" in err, err
    train.main([*args, "model.init_from_trusted=true"])
    assert marker.exists()


def test_an_export_naming_a_command_is_refused(base_run, image, tmp_path, capfd):
    """A tensors-only export whose .json names os:system with a command: nothing runs."""
    out = checkpoint.export(base_run, tmp_path / "model.safetensors")
    meta = json.loads(out.with_suffix(".json").read_text())
    marker = tmp_path / "marker"
    meta["config"]["model"] = {**meta["config"]["model"], "name": "os:system",
                               "kwargs": {"command": f"touch {marker}"}}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(meta))
    err = one_line_error(predict.main, ["--checkpoint", str(out), str(image)], capfd)
    assert not marker.exists()
    assert "'os:system'" in err and "never imports" in err and "--model" in err, err
    # --trust is about unpickling: it does not make distnn import what a file names.
    one_line_error(predict.main, ["--checkpoint", str(out), "--trust", str(image)], capfd)
    assert not marker.exists()


def test_an_export_is_safetensors_and_predicts_like_its_checkpoint(base_run, image, tmp_path):
    from safetensors.torch import load_file

    out = checkpoint.export(base_run, tmp_path / "model.safetensors")
    weights = checkpoint_files.model_state(checkpoint_files.load_file(base_run))
    assert load_file(out).keys() == weights.keys()
    from_export = predict.main(["--checkpoint", str(out), str(image)])
    assert from_export == predict.main(["--checkpoint", str(base_run), str(image)])
    # A .pt export of earlier versions (a plain state_dict with its .json) still predicts.
    torch.save(weights, tmp_path / "old.pt")
    shutil.copy(out.with_suffix(".json"), tmp_path / "old.json")
    assert predict.main(["--checkpoint", str(tmp_path / "old.pt"), str(image)]) == from_export


def test_weights_without_their_json_are_one_line(base_run, image, tmp_path, capfd):
    weights = checkpoint_files.model_state(checkpoint_files.load_file(base_run))
    torch.save(weights, tmp_path / "plain.pt")
    err = one_line_error(predict.main, ["--checkpoint", str(tmp_path / "plain.pt"), str(image)],
                         capfd)  # fmt: skip
    assert "weights only" in err and "plain.json" in err, err
    err = one_line_error(checkpoint.main, ["export", str(base_run), str(tmp_path / "m.pt")], capfd)
    assert "safetensors" in err, err


def test_latest_must_name_a_step_of_the_run(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "checkpoints" / "latest").write_text("../../elsewhere/step_00000004.pt\n")
    with pytest.raises(UserError, match="not a checkpoint of this run"):
        checkpoint_files.load_file(run)


def test_a_path_stored_in_a_checkpoint_is_not_followed(base_run, tmp_path):
    state = torch.load(checkpoint_files.latest(base_run), weights_only=True)
    state["strategy"] |= {"format": dcp.FORMAT, "shards": str(tmp_path / "elsewhere")}
    torch.save(state, tmp_path / "moved.pt")
    loaded = checkpoint_files.load_file(tmp_path / "moved.pt")
    assert "shards" not in loaded["strategy"]
    got = checkpoint_files.model_state(loaded)
    for k, v in state["strategy"]["model"].items():
        assert torch.equal(got[k], v)


def test_dcp_metadata_is_read_safely(tmp_path):
    """DCP unpickles .metadata whole; distnn reads it as DCP's own classes or refuses it."""
    import torch.distributed.checkpoint as tdcp

    weights = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.float64)}
    tdcp.save({"model": weights}, checkpoint_id=tmp_path / "ok", no_dist=True)
    got = dcp.consolidate(tmp_path / "ok", "model")
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    marker = tmp_path / "marker"
    with open(tmp_path / "ok" / ".metadata", "wb") as f:
        pickle.dump(Marker(marker), f)
    with pytest.raises(safeload.Refused, match="system"):
        dcp.consolidate(tmp_path / "ok", "model")
    assert not marker.exists()


def test_dcp_entries_stored_as_bytes_are_read_safely(tmp_path):
    """DCP stores non-tensor entries (the optimizer's param_groups' values) as pickles and
    unpickles them whole: distnn's planner reads them with the safe loader."""
    import torch.distributed.checkpoint as tdcp

    tdcp.save({"w": torch.ones(3), "note": "plain"}, checkpoint_id=tmp_path / "ok", no_dist=True)
    state = {"w": torch.zeros(3), "note": None}
    dcp._read(state, tmp_path / "ok")
    assert state["note"] == "plain" and torch.equal(state["w"], torch.ones(3))
    marker = tmp_path / "marker"
    tdcp.save({"w": torch.ones(3), "note": Marker(marker)}, checkpoint_id=tmp_path / "bad",
              no_dist=True)  # fmt: skip
    with pytest.raises(safeload.Refused, match=r"entry note.*system"):
        dcp._read({"w": torch.zeros(3), "note": None}, tmp_path / "bad")
    assert not marker.exists()


def test_dcp_metadata_cannot_change_a_class(tmp_path):
    """BUILD on an admitted class (here pathlib's) would set its attributes process-wide."""
    import pathlib

    (tmp_path / ".metadata").write_bytes(b"cpathlib\nPosixPath\nN}S'_hijack'\nI1\ns\x86b.")
    with pytest.raises(safeload.Refused, match="an attempt to change"):
        safeload.dcp_metadata(tmp_path / ".metadata")
    assert not hasattr(pathlib.PosixPath, "_hijack")


def test_cifar_batches_are_read_as_arrays_only(tmp_path, make_cfg):
    """CIFAR's python batches are pickles: the array unpickler reads the real format (the
    data tests train on it) and refuses anything else."""
    write_cifar(tmp_path)
    cfg = make_cfg("data.source=cifar10", f"data.root={tmp_path}")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    assert len(safeload.array_pickle(batch, "CIFAR file")[b"labels"]) == 20
    marker = tmp_path / "marker"
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros(3), b"labels": Marker(marker)}, f, protocol=2)
    with pytest.raises(UserError, match=r"data_batch_1.*refused.*system"):
        data_lib.build(cfg, env=_single())
    assert not marker.exists()


def _single():
    from distnn.parallel.env import detect

    return detect({})


def test_timm_kwargs_that_read_files_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint_path.*model\.init_from"):
        build("timm:resnet18", 10, 32, {"checkpoint_path": str(tmp_path / "x.pth")})


def test_a_checkpoint_written_before_the_safe_loader_resumes_exactly(tmp_path):
    """OLD_CHECKPOINT (numpy arrays in its RNG states) loads with weights_only=True and its
    resumed run follows the uninterrupted one step for step."""
    whole = [*OLD_RUN, f"run.dir={tmp_path}", "train.epochs=2"]
    train.main([*whole, "run.name=whole"])
    ckpts = tmp_path / "old" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(OLD_CHECKPOINT, ckpts)
    (ckpts / "latest").write_text(OLD_CHECKPOINT.name + "\n")
    train.main([*whole, "run.name=old"])
    assert losses(tmp_path / "old") == losses(tmp_path / "whole")[4:]
    assert len(losses(tmp_path / "old")) == 4


def test_predict_cli_refuses_in_its_own_process(crafted, image):
    path, marker = crafted
    r = run_cli("-m", "distnn.predict", "--checkpoint", str(path), str(image))
    assert r.returncode == 2 and not marker.exists(), r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
