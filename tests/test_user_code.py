"""The user's own model and dataset, from a package outside the repo (tests/user_package.py
writes it into a temp dir), through every entry point: torchrun, launch/single_node.sh,
distnn.fit under torchrun, kill + resume, export + predict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from distnn import checkpoint, config
from distnn.errors import UserError
from tests import user_package
from tests.conftest import (
    FAST,
    ROOT,
    assert_same_params,
    final_weights,
    importable,
    one_line_error,
    run_cli,
    shared_run,
    shared_stdout,
)
from tests.test_fault_tolerance import step_losses, wait_for, worker_pids

MODEL = ["model.name=userpkg.nets:SmallNet", "model.kwargs.width=8"]
DATA = ["data.source=userpkg.data:Channels", "data.kwargs.n=512", "data.root=unused"]
COMMON = [*FAST, *MODEL, *DATA, "train.max_steps=16", "train.log_every=1", "optim.lr=0.05",
          "ckpt.every_steps=4", "ckpt.keep=10", "ckpt.epoch_end=false",
          "dist.timeout_s=60"]  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Where the user's package lies: outside the repo."""
    return user_package.write(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def package(site) -> dict[str, str]:
    """The environment that finds the user's package (PYTHONPATH, as a user sets it)."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}


def cli(package: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_cli(*args, env=package, timeout=timeout)


def torchrun(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "distnn.train", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", *COMMON,
            "train.batch_size=16", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def one_rank(package, tmp_path_factory) -> Path:
    """1 process × batch 32: what 2 ranks × 16 must reproduce."""

    def command(run_dir: Path) -> list[str]:
        return ["-m", "distnn.train", f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
                *COMMON, "train.batch_size=32"]  # fmt: skip

    return shared_run(tmp_path_factory, "user_one_rank", command, env=package)


@pytest.fixture(scope="module")
def two_ranks(package, tmp_path_factory) -> tuple[Path, str]:
    command = lambda run_dir: torchrun(run_dir, "log.progress=lines")  # noqa: E731
    run_dir = shared_run(tmp_path_factory, "user_two_ranks", command, env=package)
    return run_dir, shared_stdout(run_dir)


def assert_same_run(run_dir: Path, reference: Path, rtol: float) -> None:
    got, want = step_losses(run_dir), step_losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rtol), step
    assert_same_params(final_weights(run_dir), final_weights(reference), rtol, atol=rtol / 10)


@pytest.mark.timeout(300)
def test_torchrun_two_ranks_equal_one_rank_with_double_batch(two_ranks, one_rank):
    run_dir, stdout = two_ranks
    assert_same_run(run_dir, one_rank, rtol=1e-5)
    assert "model userpkg.nets:SmallNet: " in stdout and " parameters " in stdout
    saved = config.load(run_dir / "config.yaml")
    assert saved.model.kwargs == {"width": 8} and saved.data.source == "userpkg.data:Channels"


@pytest.mark.timeout(300)
def test_launch_script_trains_the_user_package(package, tmp_path, one_rank):
    env = {**os.environ, **package, "NPROC": "2", "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", "launch/single_node.sh", f"run.dir={tmp_path}", "run.name=launched", *COMMON,
         "train.batch_size=16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "launched", one_rank, rtol=1e-5)


FIT_SCRIPT = """
import sys
import distnn
from userpkg.data import Channels
from userpkg.nets import SmallNet

if __name__ == "__main__":
    distnn.fit(overrides=sys.argv[1:], model=SmallNet,
               train_data=Channels("train", None, n=512), val_data=Channels("val", None, n=512))
"""


@pytest.mark.timeout(300)
def test_fit_in_a_script_under_torchrun_equals_the_cli(package, tmp_path, two_ranks):
    script = tmp_path / "train_mine.py"
    script.write_text(FIT_SCRIPT)
    overrides = [o for o in COMMON if not o.startswith(("model.name", "data."))]
    r = cli(package, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(script), f"run.dir={tmp_path}", "run.name=fit", *overrides,
            "train.batch_size=16", timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "fit", two_ranks[0], rtol=1e-6)
    saved = config.load(tmp_path / "fit" / "config.yaml")
    # An importable class is recorded by its import path: predict and resume can rebuild it.
    assert saved.model.name == "userpkg.nets:SmallNet" and saved.data.source == "python"


@pytest.mark.timeout(300)
def test_sigkill_mid_epoch_then_resume_follows_the_same_curve(package, tmp_path, two_ranks):
    run_dir = tmp_path / "killed"
    env = {**os.environ, **package}
    proc = subprocess.Popen([sys.executable, *torchrun(run_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(run_dir / "checkpoints" / "step_00000004.pt", proc)
    for pid in [*worker_pids(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not (run_dir / "summary.json").exists()  # killed mid-epoch: 16 steps in the epoch
    r = cli(package, *torchrun(run_dir), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at step" in r.stdout
    assert_same_run(run_dir, two_ranks[0], rtol=1e-6)


@pytest.mark.timeout(180)
def test_export_then_predict_classifies_with_the_user_model(package, tmp_path, two_ranks):
    run_dir = two_ranks[0]
    out = tmp_path / "m.safetensors"
    r = cli(package, "-m", "distnn.checkpoint", "export", str(run_dir), str(out))
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, package["PYTHONPATH"].split(os.pathsep)[1])
    try:
        from userpkg.data import Channels

        val = Channels("val", None, n=24)
    finally:
        sys.path.pop(0)
    paths = []
    for i in range(len(val)):
        image, label = val[i]
        path = tmp_path / "images" / val.classes[label] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(str(path))
    # The import path the export names is never imported: the user names it again, and the
    # export's model.kwargs (width=8) go to it because it is the same callable.
    r = cli(package, "-m", "distnn.predict", "--checkpoint", str(out), *paths)
    assert r.returncode == 2 and "never imports" in r.stderr, r.stderr
    r = cli(package, "-m", "distnn.predict", "--checkpoint", str(out), "--model",
            "userpkg.nets:SmallNet", *paths)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 24
    right = sum(ln.split(": ")[1].split(" ")[0] == ln.split("(true: ")[1][:-1] for ln in lines)
    # 16 steps reach ~0.7 val top-1 (the run's own eval); chance is 0.25.
    assert right >= 12, r.stdout


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nopkg.nets:Net", "cannot import nopkg.nets: ModuleNotFoundError"),
        ("userpkg.nets:Missing", "userpkg.nets has no attribute 'Missing'"),
        ("userpkg.nets:broken", "building it raised RuntimeError: no weights for you"),
        ("userpkg.nets:not_a_model", "returned a dict, not a torch.nn.Module"),
    ],
)
def test_a_bad_model_name_is_one_line(site, tmp_path, capfd, name, message):
    """In this process (the torchrun test below starts the CLI)."""
    from distnn.train import main

    with importable(site, "userpkg"):
        line = one_line_error(main, [f"run.dir={tmp_path}", *COMMON, f"model.name={name}"], capfd)
    assert line.startswith(f"error: model.name={name!r}") and message in line
    assert not (tmp_path / "default").exists()


@pytest.mark.timeout(120)
def test_under_torchrun_every_rank_refuses_before_a_process_group_forms(package, tmp_path):
    # A rank that formed a group would wait dist.timeout_s (5 s) for the other; none does.
    r = cli(package, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "distnn.train", f"run.dir={tmp_path}", *COMMON[:-1], "model.name=nopkg.nets:Net",
            "dist.timeout_s=5")  # fmt: skip
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and all("cannot import nopkg.nets" in ln for ln in errors)
    assert "timed out" not in r.stderr.lower() and "timeout" not in r.stderr.lower()


def test_fit_takes_module_objects_and_datasets(make_cfg, tmp_path):
    """A model object defined in a notebook is recorded as python:<class>; Predictor takes it
    back; a dataset of the wrong kind is one line."""
    import distnn
    from distnn.predict import Predictor
    from examples.own_model_and_data import Stripes, TwoLayerNet

    overrides = [f"run.dir={tmp_path}", "run.name=nb", *FAST, "train.max_steps=4",
                 "train.batch_size=16"]  # fmt: skip
    net = TwoLayerNet(num_classes=2)
    summary = distnn.fit(None, overrides, model=net, train_data=Stripes(64, 0),
                         val_data=Stripes(32, 1))  # fmt: skip
    assert summary["steps"] == 4
    state = checkpoint.load_file(tmp_path / "nb")
    assert state["config"]["model"]["name"] == "python:TwoLayerNet"
    with pytest.raises(UserError, match=r"handed to distnn\.fit"):
        Predictor(state, torch.device("cpu"))
    predictor = Predictor(state, torch.device("cpu"), model=TwoLayerNet(num_classes=2))
    image = tmp_path / "x.png"
    Image.fromarray(Stripes(1, 5)[0][0].permute(1, 2, 0).numpy()).save(image)
    assert predictor.probabilities([image]).shape == (1, 2)
    with pytest.raises(UserError, match="train_data and val_data together"):
        distnn.fit(None, overrides, train_data=Stripes(8, 0))
    with pytest.raises(UserError, match="not a map-style dataset"):
        distnn.fit(None, overrides, train_data=iter([]), val_data=Stripes(8, 1))


@pytest.mark.timeout(240)
def test_example_script_runs_under_torchrun(tmp_path):
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "examples/own_model_and_data.py", f"run.dir={tmp_path}", *FAST,
                "train.epochs=1", timeout=200)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("val top-1") == 1
    top1 = float(r.stdout.split("val top-1 ")[1].split()[0])
    assert top1 >= 0.9, r.stdout  # stripes are easy: the script's own model learns them


def test_user_dataset_samples_are_checked(make_cfg, package):
    """Every sample type converts; a label out of range is a bad sample (data.on_error)."""
    from distnn.data import custom

    rgb = torch.randint(0, 255, (3, 5, 7), dtype=torch.uint8)
    hwc = rgb.permute(1, 2, 0).numpy()
    for image in (rgb, hwc, Image.fromarray(hwc), rgb[:1], hwc[..., 0]):
        out = custom.to_chw(image)
        assert out.shape == (3, 5, 7) and out.dtype == torch.uint8
    assert torch.equal(custom.to_chw(Image.fromarray(hwc)), rgb)
    split = custom.DatasetSplit([(rgb, 3), (rgb, torch.tensor(1)), (rgb.float(), 0)], 2)
    with pytest.raises(UserError, match=r"label 3 is not a class index in 0\.\.1"):
        split.sample(0)
    assert split.sample(1)[1] == 1
    with pytest.raises(UserError, match=r"torch\.float32"):
        split.sample(2)
    with pytest.raises(UserError, match="no `classes` attribute"):
        custom.from_datasets([(rgb, 0)], [(rgb, 0)], None, "python")
    train_split = custom.from_datasets([(rgb, 0)], [(rgb, 1)], 2, "python")
    assert train_split.classes == ["0", "1"]
    with pytest.raises(UserError, match=r"train sample 0: KeyError: 'image'"):
        custom.from_datasets(Broken(), [(rgb, 0)], 2, "python")
    with pytest.raises(UserError, match=r"not a map-style dataset"):
        custom.from_datasets(Stream(), [(rgb, 0)], 2, "python")


class Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise KeyError("image")


class Stream(torch.utils.data.IterableDataset):
    def __len__(self) -> int:
        return 4

    def __iter__(self):
        return iter([])


class Flaky(torch.utils.data.Dataset):
    """Stripes whose sample 5 cannot be read."""

    def __init__(self, n: int, seed: int) -> None:
        from examples.own_model_and_data import Stripes

        self.inner, self.classes = Stripes(n, seed), Stripes.classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        if i == 5:
            raise OSError("disk says no")
        return self.inner[i]


def test_unreadable_samples_of_a_user_dataset_follow_data_on_error(tmp_path):
    import distnn
    from distnn.monitor import read_metrics
    from examples.own_model_and_data import TwoLayerNet

    overrides = [f"run.dir={tmp_path}", *FAST, "train.max_steps=4", "train.batch_size=16",
                 "train.log_every=1"]  # fmt: skip
    data = {"model": TwoLayerNet, "train_data": Flaky(64, 0), "val_data": Flaky(32, 1)}
    summary = distnn.fit(None, [*overrides, "run.name=skip"], **data)
    assert summary["steps"] == 4
    assert max(r.get("data_errors", 0) for r in read_metrics(tmp_path / "skip")) >= 1
    with pytest.raises(UserError, match=r"sample 5: OSError: disk says no"):
        distnn.fit(None, [*overrides, "run.name=raise", "data.on_error=raise"], **data)


@pytest.mark.timeout(120)
def test_every_init_scheme_is_the_same_on_every_rank(package):
    r = cli(package, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/scripts/init_ranks.py", *MODEL, "train.seed=3", timeout=100)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(v["same_on_every_rank"] for v in result.values()), result
    checksums = [v["checksum"] for v in result.values()]
    assert len(set(checksums)) == 4  # each scheme re-initialised the user's model its own way
