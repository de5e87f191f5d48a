"""Shared fixtures: small configs and datasets written in the official on-disk formats."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from distnn import checkpoint, checkpoint_files, config, safeload
from distnn.monitor import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread in every test process and every process a test starts (torchrun sets
# this itself for 2 processes a node, not for 1): `pytest -n 2` on 2 cores already runs two
# tests at once, and a second OpenMP thread spins on a busy core (a single-process resume test
# took 90 s of CPU with 2 threads, 61 s with 1, beside another job). One thread everywhere
# also makes an in-process reference sum its convolutions as a torchrun rank does.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Small and fast: no worker processes, no progress bar, runs under the test's tmp dir.
FAST = ["data.workers=0", "log.progress=off", "log.wandb.mode=disabled"]


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str) -> config.Config:
        return config.load(None, [f"run.dir={tmp_path / 'runs'}", *FAST, *overrides])

    return make


# Tests that share an expensive fixture run on one xdist worker, so it is built once: the
# session's Slurm clusters, and the quick benchmark run. Their xdist_group mark cannot do it
# here: pytest-xdist 3.8 tags the group onto item._nodeid, which pytest 9 no longer reads, so
# `--dist loadgroup` splits the group. This scheduler groups them by file instead, under
# `-n N` with load or loadgroup.
TOGETHER = {
    "tests/test_slurm.py": "cluster",
    "tests/test_submit.py": "cluster",
    "tests/test_benchmarks.py": "benchmarks",
    # Its 2- and 3-rank cases compare phase times with an unslowed run's: 5 processes at once
    # on 2 cores made the plain runs' compute 1.4x the slowed ones'. One after the other.
    "tests/test_ranks.py::test_a_slow_rank_is_the_slowest_and_the_others_wait_in_comm": "slow",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None  # xdist's own for the other modes
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixturesTogether(LoadScopeScheduling):
        """Every test its own unit of work, except the groups above (files, or one test's
        parametrised cases): one unit each, sent first (units go out largest first)."""

        def _split_scope(self, nodeid: str) -> str:
            test = nodeid.split("[")[0]  # a parametrised test's cases, or its whole file
            return TOGETHER.get(test) or TOGETHER.get(nodeid.split("::")[0], nodeid)

    return SharedFixturesTogether(config, log)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm (tests/cluster.py) for the whole session."""
    from tests import cluster

    with cluster.single_node(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="session")
def two_host_cluster(tmp_path_factory):
    """A real two-node Slurm on two network-namespace hosts, dnn1 and dnn2."""
    from tests import cluster

    with cluster.two_hosts(tmp_path_factory.mktemp("hosts")) as c:
        yield c


def run_cli(*args: str, timeout: float = 120, cwd: Path | None = None, env: dict | None = None):
    """Run `python -m ...` in a fresh process (exit codes and stderr as a user sees them). The
    repo goes first on PYTHONPATH, which keeps what it held (make gpu-check's carried wheels)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=full_env,
    )


def shared(tmp_path_factory, name: str, build: Callable[[Path], str | None]) -> Path:
    """`build(path)` once in the whole session, by whichever xdist worker asks first; the other
    waits for it and reads the same path. For the reference runs that tests on either worker
    compare against (2-3 processes each, 5+ s of start-up apiece): a module fixture is built
    again on every worker, and again when a module's tests are interleaved with others'.
    Tests only read what it holds; what build returns (a run's stdout) is `shared_stdout`."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's, shared by its workers
    path, done = base / "shared" / name, base / "shared" / f"{name}.done"
    path.parent.mkdir(exist_ok=True)
    with open(base / "shared" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on a failure
        if not done.exists():  # a build that failed left no marker: this one starts afresh
            shutil.rmtree(path, ignore_errors=True)
            out = build(path)
            path.with_name(f"{name}.stdout").write_text(out or "")
            done.touch()
    return path


def shared_stdout(path: Path) -> str:
    return path.with_name(f"{path.name}.stdout").read_text()


def shared_run(
    tmp_path_factory, name: str, command: Callable[[Path], list[str]], timeout: float = 240,
    env: dict | None = None,
) -> Path:  # fmt: skip
    """`shared()` for a run that `run_cli(*command(path))` makes: it must exit 0."""

    def build(path: Path) -> str:
        r = run_cli(*command(path), timeout=timeout, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    return shared(tmp_path_factory, name, build)


# The 2-rank equivalence runs (test_fsdp, test_deepspeed): 10 steps of global batch 16 (2 × 8)
# on tutorial_cnn (no BatchNorm, no dropout), fp32, SGD with momentum, an EMA of the weights.
# 513 validation samples: rank 0 evaluates 33 batches of 8, rank 1 32, and the sharded
# forwards of FSDP and ZeRO-3 must still meet rank 0's last.
EQUIVALENCE = [*FAST, "train.max_steps=10", "train.log_every=1", "data.synthetic_train=256",
               "data.synthetic_val=513", "optim.lr=0.05", "ckpt.epoch_end=false",
               "precision=fp32", "train.ema_decay=0.8", "dist.timeout_s=120"]  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 180):
    return run_cli(
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args,
        env=env, timeout=timeout,
    )  # fmt: skip


def two_ranks(
    run_dir: Path, *overrides: str, timeout: float = 400, env: dict | None = None, restarts: int = 0
):
    """2 torchrun processes of EQUIVALENCE + overrides into run_dir (torchrun restarting the
    group up to `restarts` times); the finished process."""
    r = torchrun(2, f"--max-restarts={restarts}", "-m", "distnn.train",
                 f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", *EQUIVALENCE,
                 *overrides, env=env, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory) -> Path:
    """DDP on 2 ranks × 8: what FSDP and every ZeRO stage must reproduce."""

    def build(path: Path) -> str:
        return two_ranks(path, "strategy.name=ddp", "train.batch_size=8").stdout

    return shared(tmp_path_factory, "ddp_2x8", build)


def one_line_error(main: Callable[[list[str]], object], argv: list[str], capfd) -> str:
    """A CLI's main run in this process as `python -m` runs it: exit code 2 and one line on
    stderr, `error: ...`. stderr is read at the file descriptor, where a library's logging
    handler writes too. (A process of its own adds only the imports' output: each CLI has a
    test that starts one.)"""
    capfd.readouterr()  # what the test wrote before is not this command's
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@contextlib.contextmanager
def importable(directory: Path, package: str) -> Iterator[None]:
    """`package`, a user's, importable from `directory` in this process, then forgotten."""
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))
        for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
            del sys.modules[name]


# --- datasets in their official on-disk formats -----------------------------------------------


def _cifar_images(rng, n: int, first: int):
    """n random CIFAR rows (N × 3072 uint8: 1024 red, 1024 green, 1024 blue values, row-major).

    The channels use disjoint value ranges (red high, green middle, blue low) so a channel swap
    shows, and each row's first two red bytes hold its global index (`first` + row), so a sample
    read back from the wrong place shows too."""
    import numpy as np

    red = rng.integers(160, 256, (n, 1024))
    green = rng.integers(80, 160, (n, 1024))
    blue = rng.integers(0, 80, (n, 1024))
    data = np.concatenate([red, green, blue], axis=1).astype(np.uint8)
    index = np.arange(first, first + n)
    data[:, 0] = 160 + index % 96
    data[:, 1] = 160 + index // 96 % 96
    return data


def _dump_pickle(path: Path, obj) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # what the published archives use


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 20, seed: int = 0) -> dict:
    """Write a small CIFAR-10 or CIFAR-100 in the exact layout of the official python archives.

    cifar10: root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar100: root/cifar-100-python/{train, test, meta}
    Every file is a protocol-2 pickle of a dict with bytes keys. Each cifar10 batch holds
    `per_batch` samples (train: 5 of them); cifar100's train file holds 5 × per_batch.

    Returns what was written: dir, classes, train_data/val_data (N × 3072 uint8),
    train_labels/val_labels (lists of int; cifar100: the fine labels) and, for cifar100,
    coarse_classes and train_coarse/val_coarse.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n_train, n_val = 5 * per_batch, per_batch
    train_data = _cifar_images(rng, n_train, 0)
    val_data = _cifar_images(rng, n_val, n_train)

    def filenames(split: str, n: int, first: int) -> list[bytes]:
        return [f"{split}_{first + i:05d}.png".encode() for i in range(n)]

    if name == "cifar10":
        directory = Path(root) / "cifar-10-batches-py"
        directory.mkdir(parents=True, exist_ok=True)
        classes = [
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ]  # fmt: skip
        train_labels = rng.integers(0, 10, n_train).tolist()
        val_labels = rng.integers(0, 10, n_val).tolist()
        for b in range(5):
            rows = slice(b * per_batch, (b + 1) * per_batch)
            _dump_pickle(
                directory / f"data_batch_{b + 1}",
                {
                    b"batch_label": f"training batch {b + 1} of 5".encode(),
                    b"labels": train_labels[rows],
                    b"data": train_data[rows],
                    b"filenames": filenames("train", per_batch, b * per_batch),
                },
            )
        _dump_pickle(
            directory / "test_batch",
            {
                b"batch_label": b"testing batch 1 of 1",
                b"labels": val_labels,
                b"data": val_data,
                b"filenames": filenames("test", n_val, n_train),
            },
        )
        _dump_pickle(
            directory / "batches.meta",
            {
                b"label_names": [c.encode() for c in classes],
                b"num_cases_per_batch": per_batch,
                b"num_vis": 3072,
            },
        )
        return {
            "dir": directory,
            "classes": classes,
            "train_data": train_data,
            "train_labels": train_labels,
            "val_data": val_data,
            "val_labels": val_labels,
        }

    if name != "cifar100":
        raise ValueError(f"write_cifar: unknown name {name!r}")
    directory = Path(root) / "cifar-100-python"
    directory.mkdir(parents=True, exist_ok=True)
    coarse_classes = [f"superclass_{i:02d}" for i in range(20)]
    classes = [f"{coarse_classes[i % 20]}_kind_{i // 20}" for i in range(100)]
    train_labels = rng.integers(0, 100, n_train).tolist()
    val_labels = rng.integers(0, 100, n_val).tolist()
    train_coarse = [label % 20 for label in train_labels]
    val_coarse = [label % 20 for label in val_labels]
    for split, labels, coarse, data, first in (
        ("train", train_labels, train_coarse, train_data, 0),
        ("test", val_labels, val_coarse, val_data, n_train),
    ):
        _dump_pickle(
            directory / split,
            {
                b"filenames": filenames(split, len(labels), first),
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": labels,
                b"coarse_labels": coarse,
                b"data": data,
            },
        )
    _dump_pickle(
        directory / "meta",
        {
            b"fine_label_names": [c.encode() for c in classes],
            b"coarse_label_names": [c.encode() for c in coarse_classes],
        },
    )
    return {
        "dir": directory,
        "classes": classes,
        "coarse_classes": coarse_classes,
        "train_data": train_data,
        "train_labels": train_labels,
        "train_coarse": train_coarse,
        "val_data": val_data,
        "val_labels": val_labels,
        "val_coarse": val_coarse,
    }


def write_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: tuple[int, int] = (3, 2),
    size: int = 40,
    exts: tuple[str, ...] = (".png", ".jpg", ".JPEG"),
) -> dict:
    """Write root/train/<class>/* and root/val/<class>/* as real image files with PIL.

    Images are size high and size + 8 wide (an H/W mix-up shows), extensions cycle through
    `exts`, and the first training image is saved as an 8-bit grayscale ('L') PNG, whatever
    `exts` says, to exercise conversion to RGB. Pixels are smooth gradients plus a per-image
    offset, so JPEG's loss stays small.

    Returns {"classes": [...], "train": [...], "val": [...]} where each split lists
    (path, label, expected H × W × 3 uint8 array, exact) in no particular order; `exact` is
    True for lossless files (PNG).
    """
    import numpy as np
    from PIL import Image

    height, width = size, size + 8
    yy, xx = np.mgrid[0:height, 0:width]
    written: dict = {"classes": sorted(classes), "train": [], "val": []}
    count = 0
    for split, n in (("train", per_class[0]), ("val", per_class[1])):
        for cls in classes:
            class_dir = Path(root) / split / cls
            class_dir.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                offset = (count * 23) % 100
                rgb = np.stack(
                    [offset + 3 * xx, 30 + offset + 3 * yy, 200 - offset - xx - yy], axis=-1
                )
                rgb = rgb.clip(0, 255).astype(np.uint8)
                ext = exts[j % len(exts)]
                gray = count == 0
                if gray:
                    ext = ".png"
                path = class_dir / f"{cls}_{j:03d}{ext}"
                if gray:
                    img = Image.fromarray(rgb[..., 0], mode="L")
                    expected = np.repeat(rgb[..., :1], 3, axis=-1)
                else:
                    img = Image.fromarray(rgb, mode="RGB")
                    expected = rgb
                fmt = "PNG" if ext.lower() == ".png" else "JPEG"
                img.save(
                    path, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {})
                )
                written[split].append((path, sorted(classes).index(cls), expected, fmt == "PNG"))
                count += 1
    return written


def final_weights(run_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model state of a run's newest checkpoint (consolidated where ZeRO split it; the
    test's own runs, so DeepSpeed's pickled shards too), or the EMA of its weights."""
    state = checkpoint.load_file(run_dir, safeload.Trust("", own=run_dir))
    return checkpoint_files.model_state(state, ema=ema)


def final_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA of the weights in a run's newest checkpoint (merged where sharded)."""
    return final_weights(run_dir, ema=True)


def last_eval(run_dir: Path) -> dict[str, float]:
    return [r for r in read_metrics(run_dir) if "val_loss" in r][-1]


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of a run's train records in metrics.jsonl, in the order written."""
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


def assert_same_params(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """Two state dicts with the same keys, equal within rtol/atol, parameter by parameter."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def assert_same_weights(run_dir: Path, reference: Path, rtol: float) -> None:
    """Two runs' final weights equal within rtol (atol rtol/10), parameter by parameter."""
    assert_same_params(final_weights(run_dir), final_weights(reference), rtol, atol=rtol / 10)


def _digits_shards(path: Path) -> None:
    from distnn.data import digits, shard

    digits.write(path.parent / "digits-src")
    # 150 samples a shard: 10 train shards and 3 val ones.
    shard.main(["imagefolder", str(path.parent / "digits-src"), str(path), "--max-count=150"])


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The bundled digits in shards of 150 (10 train, 3 val), made once per session."""
    return shared(tmp_path_factory, "digits_shards_150", _digits_shards)


def digits_trained(tmp_path_factory, shards: Path, model: str, *overrides: str) -> Path:
    """A short run of `model` on the digits shards in one process, once per session."""

    def build(path: Path) -> str:
        r = run_cli("-m", "distnn.train", "--config", "configs/digits.yaml", *FAST,
                    f"data.root={shards}", f"run.dir={path.parent}", f"run.name={path.name}",
                    f"model.name={model}", "ckpt.resume=never", *overrides,
                    timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    return shared(tmp_path_factory, f"digits_{model.replace(':', '_')}", build)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, digits_shards) -> Path:
    """One epoch of the tutorial CNN on the digits shards (what predict and evaluate read)."""
    return digits_trained(tmp_path_factory, digits_shards, "tutorial_cnn", "train.epochs=1")
