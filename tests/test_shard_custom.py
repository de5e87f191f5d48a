"""The sharder on a user's own dataset (`python -m distnn.data.shard pkg.module:callable`): a
package written here, sharded by a real process, read back by the training loaders."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch
import webdataset as wds
from PIL import Image

from distnn import data
from distnn.data import manifest as mf
from distnn.data import shard as sharder
from distnn.data.custom import to_chw
from distnn.data.sources import IMAGENET_MEAN, decode
from distnn.data.transforms import TrainTransform
from distnn.parallel.env import Env
from tests.conftest import ROOT, run_cli

SPEC = "userdata.ds:Blobs"
USERDATA = '''
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pattern(seed, split, i, label):
    """32 x 32 RGB: noise per sample, the class's colour raised in one channel."""
    rng = np.random.default_rng([seed, split == "val", i])
    hwc = rng.integers(0, 128, (32, 32, 3), dtype=np.uint8)
    hwc[:, :, label % 3] += 127
    return hwc


class Unnamed(torch.utils.data.Dataset):
    """Images as PIL, HWC arrays and CHW tensors in turn; no class names."""

    def __init__(self, split, root, n=8, bad=-1, bad_label=-1, main_pid=None):
        if main_pid is not None and os.getpid() != main_pid:
            raise RuntimeError("only opens in the main process")
        self.seed = int(Path(root, "seed.txt").read_text()) if Path(root).is_dir() else len(root)
        self.split, self.n = split, n if split == "train" else n // 4
        self.bad, self.bad_label = (bad, bad_label) if split == "train" else (-1, -1)
        self.unpicklable = lambda: None  # the encoding workers open their own

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise RuntimeError(f"sample {i} is gone")
        label = i % 4
        hwc = pattern(self.seed, self.split, i, label)
        image = (Image.fromarray(hwc), hwc, torch.from_numpy(hwc).permute(2, 0, 1))[i % 3]
        return image, 99 if i == self.bad_label else label


class Blobs(Unnamed):
    classes = ["red", "green", "blue", "red again"]
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
'''
# 40 train samples, of which index 3 raises and index 7 has label 99; 10 val samples.
ARGS = ["--kwarg", "n=40", "--kwarg", "bad=3", "--kwarg", "bad_label=7", "--max-count", "16"]


@pytest.fixture(scope="module")
def userdata(tmp_path_factory):
    """The user's package on sys.path (as PYTHONPATH puts it for the sharder's process), and
    a dataset root."""
    base = tmp_path_factory.mktemp("user")
    (base / "userdata").mkdir()
    (base / "userdata" / "__init__.py").write_text("")
    (base / "userdata" / "ds.py").write_text(USERDATA)
    (base / "root").mkdir()
    (base / "root" / "seed.txt").write_text("7")
    sys.path.insert(0, str(base))
    yield base
    sys.path.remove(str(base))
    for name in [m for m in sys.modules if m == "userdata" or m.startswith("userdata.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def sharded(userdata):
    out = userdata / "out"
    env = {"PYTHONPATH": os.pathsep.join([str(userdata), str(ROOT)])}
    r = run_cli("-m", "distnn.data.shard", SPEC, str(userdata / "root"), str(out), *ARGS,
                "--workers", "2", env=env, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def own(name: str, split: str, root, **kwargs) -> dict[int, tuple[torch.Tensor, int]]:
    """The dataset's own samples, by index (those it gives)."""
    import userdata.ds

    ds = getattr(userdata.ds, name)(split=split, root=str(root), **kwargs)
    samples = {}
    for i in range(len(ds)):
        try:
            image, label = ds[i]
        except RuntimeError:
            continue
        samples[i] = (to_chw(image), label)
    return samples


def read_back(out, split: str) -> list[dict]:
    """A split's samples in global-index order, read with webdataset."""
    urls = [str(out / s.file) for s in mf.load(out).split(split)]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def shard_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        sharder.main([str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_user_dataset_shards_train_like_builtins(userdata, sharded, make_cfg):
    out, r = sharded
    assert "train 38, val 10 samples; 4 shards written, 0 reused (verified), 2 skipped" in r.stdout
    m = mf.load(out)
    assert m.classes == ["red", "green", "blue", "red again"] and m.dataset == SPEC
    assert (m.mean, m.std) == ((127.5,) * 3, (63.75,) * 3)
    assert [s.count for s in m.split("train")] == [16, 16, 6]
    assert [s.count for s in m.split("val")] == [10]
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["created"]["options"]["kwargs"] == {"n": 40, "bad": 3, "bad_label": 7}
    assert doc["image_encoding"]["formats"] == {"png": 48}
    skipped = {s["index"]: s for s in doc["skipped"]}
    assert skipped.keys() == {3, 7} and {s["split"] for s in skipped.values()} == {"train"}
    assert skipped[3]["source"] == f"{SPEC}/train"
    assert skipped[3]["reason"] == "RuntimeError: sample 3 is gone"
    assert "label 99" in skipped[7]["reason"]
    assert "skipped userdata.ds:Blobs/train[3]: RuntimeError" in r.stderr

    # Stored losslessly, with the dataset's label and index, each sample once.
    expected = {s: own("Blobs", s, userdata / "root", n=40, bad=3) for s in ("train", "val")}
    del expected["train"][7]
    index = {}
    for split in ("train", "val"):
        samples = read_back(out, split)
        index[split] = [json.loads(s["json"])["index"] for s in samples]
        assert sorted(index[split]) == sorted(expected[split])
        for s, i in zip(samples, index[split], strict=True):
            image, label = expected[split][i]
            assert json.loads(s["json"]) == {"source": f"{SPEC}/{split}", "label": label,
                                             "index": i}  # fmt: skip
            assert int(s["cls"]) == label and torch.equal(decode(s["png"]), image)

    # The training loaders: train batches are the named samples with their seeded augmentation,
    # eval at the stored size gives the dataset's images themselves.
    cfg = make_cfg("data.source=shards", f"data.root={out}", "data.image_size=32",
                   "train.batch_size=4", "train.seed=3")  # fmt: skip
    loaders = data.build(cfg, Env())
    assert (loaders.train_size, loaders.val_size, loaders.classes) == (38, 10, m.classes)
    assert loaders.mean == (127.5,) * 3
    transform = TrainTransform(32, seed=3)
    loaders.train_order.set_epoch(1)
    n = 0
    for (epoch, items), (x, y) in zip(loaders.train_order, loaders.train, strict=True):
        for row, label, g in zip(x, y.tolist(), items.tolist(), strict=True):
            image, want = expected["train"][index["train"][g]]
            assert label == want and torch.equal(row, transform(image, g, epoch))
            n += 1
    assert n == 36 == loaders.steps_per_epoch * 4
    seen = []
    for x, y in loaders.val:
        for row, label in zip(x, y.tolist(), strict=True):
            i = next(i for i, (image, _) in expected["val"].items() if torch.equal(row, image))
            assert label == expected["val"][i][1]
            seen.append(i)
    assert sorted(seen) == list(range(10)) and loaders.errors.skipped == 0


def test_rerun_reuses_shards_and_other_kwargs_are_refused(userdata, sharded, capsys):
    out, _ = sharded
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    sharder.main([SPEC, str(userdata / "root"), str(out), *ARGS, "--workers", "1"])
    assert "0 shards written, 4 reused" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    assert len(json.loads((out / "manifest.json").read_text())["skipped"]) == 2
    for changed in (["--kwarg", "n=44"], ["--kwarg", "bad_label=8"]):
        argv = [SPEC, userdata / "root", out, *ARGS, *changed]
        assert "other options" in shard_error(capsys, *argv)
    other_root = userdata / "root2"
    other_root.mkdir(exist_ok=True)
    (other_root / "seed.txt").write_text("7")
    assert "other options" in shard_error(capsys, SPEC, other_root, out, *ARGS)


@pytest.mark.timeout(60)
def test_strict_stops_at_the_bad_sample(userdata, tmp_path, capsys):
    root, args = userdata / "root", ["--kwarg", "n=12", "--kwarg", "bad=5", "--strict"]
    for workers in ("1", "2"):
        line = shard_error(capsys, SPEC, root, tmp_path / workers, *args, "--workers", workers)
        assert f"'{SPEC}/train[5]': RuntimeError: sample 5 is gone (--strict)" in line


def test_bad_kinds_and_options_are_one_line(userdata, tmp_path, capsys):
    root, out = userdata / "root", tmp_path / "out"
    line = shard_error(capsys, "cifar11", root, out)
    assert "cifar10, cifar100, imagefolder or a pkg.module:callable" in line
    line = shard_error(capsys, "nope.mod:X", root, out)
    assert line.startswith("error: kind='nope.mod:X': cannot import") and "'nope'" in line
    assert "has no attribute 'Gone'" in shard_error(capsys, "userdata.ds:Gone", root, out)
    assert "not KEY=VALUE" in shard_error(capsys, SPEC, root, out, "--kwarg", "n")
    assert "passes root=" in shard_error(capsys, SPEC, root, out, "--kwarg", "root=x")
    assert "--kwarg" in shard_error(capsys, "cifar10", root, out, "--kwarg", "n=1")
    line = shard_error(capsys, SPEC, root, out, "--kwarg", "nn=1")  # the callable raises
    assert line.startswith(f"error: kind='{SPEC}': calling it for split='train' raised TypeError")
    assert "unexpected keyword argument 'nn'" in line
    assert "does not match the 4 classes" in shard_error(capsys, SPEC, root, out, "--num-classes=3")
    assert not out.exists()


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_open_the_dataset_stops_the_run(userdata, tmp_path, capsys):
    args = ["--kwarg", f"main_pid={os.getpid()}", "--workers", "2"]
    line = shard_error(capsys, SPEC, userdata / "root", tmp_path / "out", *args)
    assert "encoding worker could not open the dataset" in line
    assert "only opens in the main process" in line


def test_without_classes_num_classes_names_them(userdata, tmp_path, capsys):
    spec, root, out = "userdata.ds:Unnamed", "mem://not-a-directory", tmp_path / "out"
    line = shard_error(capsys, spec, root, out)
    assert "no `classes` attribute" in line and "--num-classes" in line
    # Labels are i % 4: with 3 classes, label 3 (train 3, 7, 11, 15; val 3) is a bad sample.
    args = ["--kwarg", "n=16", "--num-classes", "3", "--resize", "16", "--workers", "1"]
    sharder.main([spec, root, str(out), *args])
    m = mf.load(out)
    assert m.classes == ["0", "1", "2"] and m.mean == IMAGENET_MEAN
    doc = json.loads((out / "manifest.json").read_text())
    skipped = sorted((s["split"], s["index"]) for s in doc["skipped"])
    assert skipped == [("train", 3), ("train", 7), ("train", 11), ("train", 15), ("val", 3)]
    assert all("not a class index in 0..2" in s["reason"] for s in doc["skipped"])
    assert doc["created"]["options"]["root"] == root
    expected = own("Unnamed", "val", root, n=16)
    samples = read_back(out, "val")
    assert sorted(json.loads(s["json"])["index"] for s in samples) == [0, 1, 2]
    for s in samples:
        image, label = expected[json.loads(s["json"])["index"]]
        small = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((16, 16), Image.BICUBIC)
        assert int(s["cls"]) == label and Image.open(io.BytesIO(s["png"])).size == (16, 16)
        assert torch.equal(decode(s["png"]), to_chw(small))  # --resize, then lossless
