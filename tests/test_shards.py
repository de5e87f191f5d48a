"""Shards: the sharder's output read back with webdataset and tar, foreign shards, equal steps
and exact evaluation across ranks × workers, resume, re-runs, and unreadable samples."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from distnn import checkpoint, checkpoint_files, config, data, models
from distnn.data import manifest as mf
from distnn.data import shard as sharder
from distnn.data.order import ShardOrder
from distnn.data.prefetch import DevicePrefetcher
from distnn.data.sources import decode
from distnn.data.transforms import EvalTransform, TrainTransform
from distnn.errors import UserError
from distnn.monitor import read_metrics
from distnn.parallel.env import Env
from distnn.train import train
from tests.conftest import FAST, ROOT, run_cli, write_cifar, write_imagefolder


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def shards_cfg(make_cfg, root, *extra: str):
    return make_cfg("data.source=shards", f"data.root={root}", "train.batch_size=4", *extra)


def stamp(image: torch.Tensor) -> int:
    """The global index write_cifar stamps into a CIFAR image's first two red pixels."""
    return int(image[0, 0, 0]) - 160 + (int(image[0, 0, 1]) - 160) * 96


def read_back(out, split):
    """Every sample of a split's shards, read with webdataset's own pipeline."""
    m = mf.load(out)
    urls = [str(out / s.file) for s in m.split(split)]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """100 train + 20 test CIFAR-10 samples in shards of at most 30 (4 + 1 shards)."""
    root = tmp_path_factory.mktemp("cifar")
    written = write_cifar(root / "src", "cifar10", per_batch=20)
    sharder.main(["cifar10", str(root / "src"), str(root / "out"), "--max-count=30", "--workers=2"])
    return written, root / "out"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """35 train samples in 3 shards (12, 12, 11), 7 test samples in one."""
    root = tmp_path_factory.mktemp("small")
    write_cifar(root / "src", "cifar10", per_batch=7, seed=3)
    sharder.shard("cifar10", root / "src", root / "out", max_count=12)
    return root / "out"


# --- the sharder ------------------------------------------------------------------------------


def test_cifar_shards_read_back_exactly(cifar):
    written, out = cifar
    m = mf.load(out)
    assert m.classes == written["classes"] and m.dataset == "cifar10"
    assert [s.count for s in m.split("train")] == [30, 30, 30, 10]
    assert [s.count for s in m.split("test")] == [20]
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["splits"]["train"]["count"] == 100 and doc["totals"]["count"] == 120
    assert doc["image_encoding"]["formats"] == {"png": 120}
    assert doc["created"]["command"].startswith("python -m distnn.data.shard cifar10 ")
    for split, rows, labels, first in (
        ("train", written["train_data"], written["train_labels"], 0),
        ("test", written["val_data"], written["val_labels"], 100),
    ):
        samples = read_back(out, split)
        seen = sorted(json.loads(s["json"])["index"] for s in samples)
        assert seen == list(range(len(rows)))  # every sample exactly once
        for s in samples:
            i = json.loads(s["json"])["index"]
            assert int(s["cls"]) == labels[i]
            image = decode(s["png"])  # lossless: the exact CIFAR row, channels in order
            assert torch.equal(image, torch.from_numpy(rows[i].reshape(3, 32, 32)))
            assert stamp(image) == first + i
    for shard in m.split("train") + m.split("test"):
        path = out / shard.file
        assert shard.sha256 == mf.sha256_file(path) and shard.bytes == path.stat().st_size
    # Shuffled before writing: the first shard mixes classes.
    first_shard = read_back(out, "train")[:30]
    assert len({int(s["cls"]) for s in first_shard}) >= 5
    listing = subprocess.run(
        ["tar", "tf", str(out / "train-000000.tar")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(listing) == 90
    keys = [name.split(".")[0] for name in listing[::3]]
    assert listing == [f"{k}.{e}" for k in keys for e in ("cls", "json", "png")]
    assert len(set(keys)) == 30


def test_cifar100_keeps_fine_classes(tmp_path):
    written = write_cifar(tmp_path / "src", "cifar100", per_batch=4, seed=1)
    sharder.shard("cifar100", tmp_path / "src", tmp_path / "out", max_count=50)
    m = mf.load(tmp_path / "out")
    assert m.classes == written["classes"] and len(m.classes) == 100
    labels = {json.loads(s["json"])["index"]: int(s["cls"]) for s in read_back(m.root, "train")}
    assert labels == dict(enumerate(written["train_labels"]))


def test_imagefolder_shards_copy_bytes(tmp_path, capsys):
    written = write_imagefolder(tmp_path / "src", per_class=(4, 2), exts=(".png", ".jpg", ".JPEG"))
    bad = tmp_path / "src" / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    (tmp_path / "src" / "train" / "fox" / "notes.txt").write_text("not an image")
    sharder.shard("imagefolder", tmp_path / "src", tmp_path / "out", max_count=5)
    assert "broken.jpg" in capsys.readouterr().err  # warned
    m = mf.load(tmp_path / "out")
    assert m.classes == ["cat", "dog", "fox"]
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {s["source"]: s["reason"] for s in doc["skipped"]}
    assert set(reasons) == {"train/dog/broken.jpg", "train/fox/notes.txt"}
    assert reasons["train/fox/notes.txt"] == "not an image file"
    for split in ("train", "val"):
        src = tmp_path / "src"
        expected = {str(p.relative_to(src)): (p, label) for p, label, *_ in written[split]}
        samples = read_back(tmp_path / "out", split)
        assert sorted(json.loads(s["json"])["source"] for s in samples) == sorted(expected)
        for s in samples:
            path, label = expected[json.loads(s["json"])["source"]]
            assert int(s["cls"]) == label
            ext = "png" if path.suffix == ".png" else "jpg"  # .JPEG and .jpg both → .jpg
            assert s[ext] == path.read_bytes()  # byte for byte
    assert sum(s.count for s in m.split("train")) == 12
    suffixes = [p.suffix for split in ("train", "val") for p, *_ in written[split]]
    n_png = suffixes.count(".png")
    assert doc["image_encoding"]["formats"] == {"png": n_png, "jpg": len(suffixes) - n_png}


def test_resize_reencodes_large_images(tmp_path):
    write_imagefolder(tmp_path / "src", per_class=(1, 1), size=64)
    sharder.shard("imagefolder", tmp_path / "src", tmp_path / "out", resize=20, quality=80)
    for s in read_back(tmp_path / "out", "train"):
        ext = "jpg" if "jpg" in s else "png"
        assert min(Image.open(io.BytesIO(s[ext])).size) == 20


def sharder_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        sharder.main([str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_sharder_bad_input_is_one_line(tmp_path, capsys):
    write_imagefolder(tmp_path / "src", per_class=(1, 1))
    (tmp_path / "src" / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    src = tmp_path / "src"
    assert "broken.png" in sharder_error(capsys, "imagefolder", src, tmp_path / "o", "--strict")
    (tmp_path / "src" / "train" / "cat" / "broken.png").unlink()
    (tmp_path / "src" / "train" / "empty").mkdir()
    assert "empty" in sharder_error(capsys, "imagefolder", tmp_path / "src", tmp_path / "o2")
    (tmp_path / "src" / "train" / "empty").rmdir()
    (tmp_path / "src" / "val").rename(tmp_path / "val_gone")
    assert "val/" in sharder_error(capsys, "imagefolder", tmp_path / "src", tmp_path / "o3")
    assert "cifar10" in sharder_error(capsys, "cifar10", tmp_path, tmp_path / "o4")


def test_rerun_skips_finished_shards(tmp_path, capsys):
    write_cifar(tmp_path / "src", "cifar10", per_batch=10)
    out = tmp_path / "out"
    sharder.shard("cifar10", tmp_path / "src", out, max_count=12)
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == 6  # train 12 12 12 12 2, test 10
    before = {p.name: (p.stat().st_mtime_ns, mf.sha256_file(p)) for p in tars}
    manifest = (out / "manifest.json").read_text()
    capsys.readouterr()
    sharder.shard("cifar10", tmp_path / "src", out, max_count=12)
    assert "0 shards written, 6 reused" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, mf.sha256_file(p)) for p in tars} == before
    # A crash: shard 2 never got its name, a temporary file is left over.
    (out / "train-000002.tar").unlink()
    (out / ".train-000003.tar.tmp").write_bytes(b"half a shard")
    sharder.shard("cifar10", tmp_path / "src", out, max_count=12)
    assert "3 shards written, 3 reused" in capsys.readouterr().out
    for name in ("train-000000.tar", "train-000001.tar"):
        assert (out / name).stat().st_mtime_ns == before[name][0]  # untouched
    assert {p.name: mf.sha256_file(p) for p in tars} == {k: v[1] for k, v in before.items()}
    assert not list(out.glob(".*.tmp"))
    new = json.loads((out / "manifest.json").read_text())
    assert new["splits"] == json.loads(manifest)["splits"]
    message = user_error(sharder.shard, "cifar10", tmp_path / "src", out, 12, 256_000_000, 1)
    assert "other options" in message


# --- manifests and foreign shards ---------------------------------------------------------------


def write_plain_shards(root, counts=(5, 4), size=(24, 30), bad=()):
    """Shards as another tool makes them: `key.jpg` + `key.cls` files, `tar cf`, a manifest
    written by hand (no sha256, no index). `bad` names global indices whose JPEG is garbage."""
    rng = np.random.default_rng(0)
    files, expected, g = [], [], 0
    for k, count in enumerate(counts):
        members = []
        for j in range(count):
            key = f"s{k}_{j:03d}"
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            jpg = b"garbage" * 9 if g in bad else buf.getvalue()
            (root / f"{key}.jpg").write_bytes(jpg)
            (root / f"{key}.cls").write_text(str(g % 3))
            members += [f"{key}.cls", f"{key}.jpg"]
            expected.append((jpg, g % 3))
            g += 1
        subprocess.run(["tar", "cf", f"part{k}.tar", *members], cwd=root, check=True)
        files.append({"file": f"part{k}.tar", "count": count})
    doc = {"format": "distnn-shards", "version": 1, "classes": ["a", "b", "c"],
           "splits": {"train": {"shards": files}, "val": {"shards": files}}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(doc))
    return expected


def test_plain_tar_shards_with_a_written_manifest(tmp_path, make_cfg):
    expected = write_plain_shards(tmp_path)
    cfg = shards_cfg(make_cfg, tmp_path, "data.image_size=16", "data.verify=true", "train.seed=2")
    loaders = data.build(cfg, Env())
    assert (loaders.train_size, loaders.val_size, loaders.classes) == (9, 9, ["a", "b", "c"])
    val = list(loaders.val)
    images = torch.cat([x for x, _ in val])
    assert torch.cat([y for _, y in val]).tolist() == [label for _, label in expected]
    for image, (jpg, _) in zip(images, expected, strict=True):
        assert torch.equal(image, EvalTransform(16)(decode(jpg)))
    # Training batches are the named samples with their seeded augmentation.
    transform = TrainTransform(16, seed=2)
    loaders.train_order.set_epoch(1)
    for (epoch, items), (x, y) in zip(loaders.train_order, loaders.train, strict=True):
        assert y.tolist() == [expected[g][1] for g in items]
        for row, g in zip(x, items.tolist(), strict=True):
            assert torch.equal(row, transform(decode(expected[g][0]), g, epoch))


def test_manifest_mismatches_name_the_shard(tmp_path, make_cfg, cifar):
    _, out = cifar
    assert "distnn.data.shard" in user_error(data.build, shards_cfg(make_cfg, tmp_path), Env())
    doc = json.loads((out / "manifest.json").read_text())

    def fails(mutate, *extra) -> str:
        d = json.loads(json.dumps(doc))
        mutate(d)
        root = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        for p in out.iterdir():
            (root / p.name).symlink_to(p)
        (root / "manifest.json").unlink()
        (root / "manifest.json").write_text(json.dumps(d))
        return user_error(data.build, shards_cfg(make_cfg, root, *extra), Env())

    shards = lambda d: d["splits"]["train"]["shards"]  # noqa: E731
    msg = fails(lambda d: shards(d)[1].update(file="train-000099.tar"))
    assert "train-000099.tar" in msg and "missing" in msg
    msg = fails(lambda d: shards(d)[2].update(sha256="0" * 64), "data.verify=true")
    assert "train-000002.tar" in msg and "sha256" in msg
    msg = fails(lambda d: shards(d)[3].update(count=11, bytes=None), "data.verify=true")
    assert "train-000003.tar" in msg and "10 samples, manifest says 11" in msg
    assert "version 9" in fails(lambda d: d.update(version=9))
    assert "'count'" in fails(lambda d: shards(d)[0].pop("count"))


def test_indexed_and_streamed_reads_agree(tmp_path, make_cfg, cifar):
    _, out = cifar
    doc = json.loads((out / "manifest.json").read_text())
    for split in doc["splits"].values():
        for s in split["shards"]:
            s.pop("index")
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    for p in out.glob("*.tar"):
        (tmp_path / p.name).symlink_to(p)
    a = data.build(shards_cfg(make_cfg, out), Env())
    b = data.build(shards_cfg(make_cfg, tmp_path), Env())
    for loaders in (a, b):
        loaders.train_order.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a.train, b.train, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- order: equal steps, exact evaluation, resume -------------------------------------------------


@pytest.mark.timeout(90)
def test_two_ranks_two_workers_three_shards(make_cfg, small):
    """3 shards for 2 ranks × 2 workers: the same steps on both ranks, no hang, and every
    eval sample once, as one process sees it."""
    assert len(mf.load(small).split("train")) == 3
    single = data.build(shards_cfg(make_cfg, small), Env())
    whole = {}
    for x, _ in single.val:
        whole.update({stamp(image): image for image in x})
    assert sorted(whole) == list(range(35, 42))
    train_seen, val_seen = [], {}
    for rank in range(2):
        cfg = shards_cfg(make_cfg, small, "data.workers=2")
        loaders = data.build(cfg, Env(rank=rank, world_size=2))
        assert loaders.train.num_workers == 2
        assert loaders.steps_per_epoch == 35 // 8 == 4
        for epoch in (0, 1):
            loaders.train_order.set_epoch(epoch)
            batches = list(loaders.train)
            assert [len(y) for _, y in batches] == [4] * 4
        train_seen += [g for _, items in loaders.train_order for g in items.tolist()]
        for x, _ in loaders.val:
            for image in x:
                assert stamp(image) not in val_seen
                val_seen[stamp(image)] = image
    assert len(set(train_seen)) == len(train_seen) == 32
    assert val_seen.keys() == whole.keys()
    assert all(torch.equal(val_seen[k], whole[k]) for k in whole)


@pytest.mark.parametrize(("counts", "world", "workers", "batch"), [
    ([13, 11, 9], 2, 2, 4), ([5], 3, 2, 1), ([7, 1, 30, 2], 4, 3, 2), ([40] * 3, 2, 1, 8),
])  # fmt: skip
def test_orders_are_equal_and_exact(counts, world, workers, batch):
    n = sum(counts)
    for accum in (1, 2):
        steps, seen = set(), []
        for rank in range(world):
            order = ShardOrder(counts, batch, world, rank, workers, seed=1, accum_steps=accum)
            order.set_epoch(2)
            specs = list(order)
            steps.add(len(specs))
            assert all(len(items) == batch for _, items in specs)
            seen += [g for _, items in specs for g in items.tolist()]
        assert steps == {n // (batch * world * accum) * accum}
        assert len(seen) == len(set(seen)) and set(seen) <= set(range(n))
    evals = []
    for rank in range(world):
        order = ShardOrder(counts, batch, world, rank, workers, seed=1, train=False)
        specs = list(order)
        assert len(specs) == order.steps and all(0 < len(i) <= batch for _, i in specs)
        evals += [g for _, items in specs for g in items.tolist()]
    assert sorted(evals) == list(range(n))


def test_resume_yields_the_tail_of_the_epoch():
    order = ShardOrder([13, 11, 9, 20], 4, 2, 1, 2, seed=7)
    epochs = []
    for epoch in range(3):
        order.set_epoch(epoch)
        full = [items.tolist() for _, items in order]
        epochs.append(full)
        for k in (0, 1, 4, len(full) - 1, len(full)):
            order.set_epoch(epoch, k)
            assert len(order) == len(full) - k
            assert [items.tolist() for _, items in order] == full[k:]
    assert epochs[0] != epochs[1] != epochs[2]
    again = ShardOrder([13, 11, 9, 20], 4, 2, 1, 2, seed=7)
    again.set_epoch(2)
    assert [items.tolist() for _, items in again] == epochs[2]


@pytest.mark.timeout(60)
def test_resume_through_the_loader(make_cfg, cifar):
    _, out = cifar
    loaders = data.build(shards_cfg(make_cfg, out, "data.workers=2"), Env())
    loaders.train_order.set_epoch(2)
    full = list(loaders.train)
    assert len(full) == 25
    loaders.train_order.set_epoch(2, start_batch=7)
    tail = list(loaders.train)
    assert len(tail) == len(full) - 7
    for (x, y), (fx, fy) in zip(tail, full[7:], strict=True):
        assert torch.equal(x, fx) and torch.equal(y, fy)


# --- unreadable samples -------------------------------------------------------------------------


def test_corrupt_image_is_skipped_and_counted(tmp_path, make_cfg):
    write_plain_shards(tmp_path, counts=(8,), bad=(3,))
    cfg = shards_cfg(make_cfg, tmp_path, "data.image_size=16")
    loaders = data.build(cfg, Env())
    loaders.train_order.set_epoch(0)
    sizes = sorted(len(y) for _, y in loaders.train)
    assert sizes == [3, 4]  # one batch lost the broken sample; both steps still ran
    assert loaders.errors.skipped == 1 and "part0.tar member 3" in loaders.errors.last
    assert sum(len(y) for _, y in loaders.val) == 7 and loaders.errors.skipped == 2
    # Training counts them in its metrics.
    cfg = shards_cfg(make_cfg, tmp_path, "data.image_size=16", "train.epochs=1",
                     "train.log_every=1", "run.name=corrupt")  # fmt: skip
    train(cfg)
    errors = [r["data_errors"] for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert len(errors) == 2 and errors[-1] == 1 and errors == sorted(errors)
    strict = data.build(shards_cfg(make_cfg, tmp_path, "data.on_error=raise"), Env())
    message = user_error(lambda: list(strict.train))
    assert "part0.tar member 3" in message and "data.on_error=skip" in message


def test_damaged_indexed_shard_and_truncated_tar(tmp_path, make_cfg, small):
    out = tmp_path / "out"
    out.mkdir()
    for p in small.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    # Overwrite the bytes of an image epoch 0 uses inside an indexed shard (no verify: found
    # while training).
    order = ShardOrder([12, 12, 11], 4, 1, 0, 2, seed=0)
    m = min(g - 12 for _, items in order for g in items.tolist() if 12 <= g < 24)
    index = json.loads((out / "train-000001.idx.json").read_text())["samples"]
    _key, _ext, offset, size, _label = index[m]
    with open(out / "train-000001.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    loaders = data.build(shards_cfg(make_cfg, out, "data.workers=2"), Env())
    assert sum(len(y) for _, y in loaders.train) == 31 and loaders.errors.skipped == 1
    assert f"train-000001.tar member {m}" in loaders.errors.last
    verify = shards_cfg(make_cfg, out, "data.verify=true")
    assert "train-000001.tar" in user_error(data.build, verify, Env())
    # A truncated tar read without an index: the members after the damage are skipped.
    doc = json.loads((out / "manifest.json").read_text())
    doc["splits"]["train"]["shards"][0].pop("index")
    (out / "manifest.json").write_text(json.dumps(doc))
    data_bytes = (out / "train-000000.tar").read_bytes()
    (out / "train-000000.tar").write_bytes(data_bytes[: len(data_bytes) // 2])
    loaders = data.build(shards_cfg(make_cfg, out), Env())
    assert len(list(loaders.train)) == loaders.steps_per_epoch == 8
    assert loaders.errors.skipped > 1


# --- real processes -----------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_torchrun_two_ranks_from_shards(tmp_path, make_cfg, small):
    r = run_cli(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distnn.train",
        f"run.dir={tmp_path}", "run.name=sh", *FAST, "data.workers=2", "data.source=shards",
        f"data.root={small}", "train.batch_size=4", "train.epochs=2", "log.progress=lines",
        timeout=200,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "sh" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    # 2 ranks × 2 workers reported the top-1 one process measures on the final weights.
    model = models.build("tutorial_cnn", 10, 32).eval()
    model.load_state_dict(checkpoint_files.model_state(checkpoint.load_file(tmp_path / "sh")))
    loaders = data.build(shards_cfg(make_cfg, small), Env())
    hits = n = 0
    with torch.no_grad():
        for x, y in DevicePrefetcher(loaders.val, torch.device("cpu"), loaders.mean, loaders.std):
            hits += int((model(x).argmax(1) == y).sum())
            n += len(y)
    assert n == 7 and summary["val_top1"] == pytest.approx(hits / n, abs=1e-9)


def test_demo_data_path_digits_to_shards_to_loader(tmp_path):
    """What `make demo` runs before training: the bundled digits as an ImageFolder, sharded,
    read by the demo's own config."""
    from distnn.data import digits

    counts = digits.write(tmp_path / "digits")
    sharder.main(["imagefolder", str(tmp_path / "digits"), str(tmp_path / "shards"),
                  "--max-count=250"])  # fmt: skip
    cfg = config.load(ROOT / "configs" / "digits.yaml", [f"data.root={tmp_path / 'shards'}"])
    assert cfg.data.source == "shards"
    loaders = data.build(cfg, Env())
    assert loaders.classes == [str(d) for d in range(10)]
    assert (loaders.train_size, loaders.val_size) == (counts["train"], counts["val"])
    assert loaders.train_size + loaders.val_size == 1797
    x, y = next(iter(loaders.val))
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8 and int(y.max()) < 10
