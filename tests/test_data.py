"""Data: CIFAR and ImageFolder read back from their on-disk formats, unreadable files under
data.on_error, synthetic data, sample order across ranks and resumes, deterministic
augmentation in and out of worker processes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from distnn import data
from distnn.data import sources
from distnn.data.errors import DataErrors, PolicyLoader
from distnn.data.order import EvalBatches, TrainBatches
from distnn.data.transforms import EvalTransform, TrainTransform
from distnn.errors import UserError
from distnn.monitor import read_metrics
from distnn.parallel.env import Env
from tests.conftest import FAST, one_line_error, write_cifar, write_imagefolder


def user_error(fn, *args) -> str:
    """The message of the UserError `fn(*args)` raises; it must be a single line."""
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def assert_split_matches(split, rows: np.ndarray, labels: list[int]) -> None:
    """Every image of `split` equals the CIFAR row written for it, channel order R, G, B."""
    assert len(split) == len(rows) == len(labels)
    for i in range(len(split)):
        image = split.image(i)
        assert image.dtype == torch.uint8
        assert image.shape == (3, 32, 32)
        assert torch.equal(image, torch.from_numpy(rows[i].reshape(3, 32, 32)))
        # The row's first 1024 values are red: they land in channel 0, top row first.
        assert torch.equal(image[0].flatten(), torch.from_numpy(rows[i][:1024]))
        assert split.label(i) == labels[i]
        assert type(split.label(i)) is int


# --- CIFAR ----------------------------------------------------------------------------------


def test_cifar10_reads_back_exactly(tmp_path, make_cfg):
    written = write_cifar(tmp_path, "cifar10", per_batch=20)
    ds = sources.load(make_cfg("data.source=cifar10", f"data.root={tmp_path}").data)
    assert len(ds.train) == 5 * 20
    assert len(ds.val) == 20
    assert ds.classes == written["classes"]
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert_split_matches(ds.train, written["train_data"], written["train_labels"])
    assert_split_matches(ds.val, written["val_data"], written["val_labels"])
    # Samples keep file order across the five batch files: the index stamped in each row.
    stamps = [int(ds.train.image(i)[0, 0, 0]) - 160 for i in range(len(ds.train))]
    assert stamps == [i % 96 for i in range(100)]
    # Channels keep their ranges (red high, green middle, blue low) in every image.
    images = ds.train.images
    assert images[:, 0].min() >= 160 and images[:, 1].min() >= 80 and images[:, 2].max() < 80


def test_cifar100_reads_fine_labels(tmp_path, make_cfg):
    written = write_cifar(tmp_path, "cifar100", per_batch=10, seed=1)
    ds = sources.load(make_cfg("data.source=cifar100", f"data.root={tmp_path}").data)
    assert len(ds.train) == 50
    assert len(ds.val) == 10
    assert len(ds.classes) == 100
    assert ds.classes == written["classes"]
    assert_split_matches(ds.train, written["train_data"], written["train_labels"])
    assert_split_matches(ds.val, written["val_data"], written["val_labels"])
    # Fine labels, not coarse ones: some label is >= 20, which a coarse label never is.
    assert max(written["train_labels"]) >= 20
    assert [ds.train.label(i) for i in range(50)] != written["train_coarse"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_root_may_be_the_batches_dir(tmp_path, make_cfg, name):
    written = write_cifar(tmp_path, name, per_batch=4)
    cfg = make_cfg(f"data.source={name}", f"data.root={written['dir']}")
    ds = sources.load(cfg.data)
    assert len(ds.train) == 20
    assert ds.classes == written["classes"]
    assert torch.equal(ds.val.image(3), torch.from_numpy(written["val_data"][3].reshape(3, 32, 32)))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_is_a_user_error(tmp_path, make_cfg, name):
    cfg = make_cfg(f"data.source={name}", f"data.root={tmp_path / 'empty'}")
    message = user_error(sources.load, cfg.data)
    assert "data.download" in message
    assert str(tmp_path / "empty") in message


def test_cifar_missing_batch_file(tmp_path, make_cfg):
    written = write_cifar(tmp_path, "cifar10", per_batch=4)
    (written["dir"] / "data_batch_3").unlink()
    cfg = make_cfg("data.source=cifar10", f"data.root={tmp_path}")
    assert "data_batch_3" in user_error(sources.load, cfg.data)


# --- ImageFolder ----------------------------------------------------------------------------


def test_imagefolder_reads_every_file(tmp_path, make_cfg):
    written = write_imagefolder(tmp_path, per_class=(4, 2), size=40)
    ds = sources.load(make_cfg("data.source=imagefolder", f"data.root={tmp_path}").data)
    assert ds.classes == ["cat", "dog", "fox"]
    for split, name in ((ds.train, "train"), (ds.val, "val")):
        expected = {path: (label, array, exact) for path, label, array, exact in written[name]}
        assert sorted(split.paths) == sorted(expected)  # every file, .png .jpg .JPEG alike
        assert len(split) == len(expected)
        for i, path in enumerate(split.paths):
            label, array, exact = expected[path]
            assert split.label(i) == label
            assert ds.classes[label] == path.parent.name
            image = split.image(i)
            assert image.dtype == torch.uint8
            assert image.shape == (3, 40, 48)
            want = torch.from_numpy(array).permute(2, 0, 1)
            if exact:
                assert torch.equal(image, want), path
            else:  # JPEG at quality 95, no chroma subsampling, on smooth gradients
                error = (image.float() - want.float()).abs()
                assert error.mean() < 1.5 and error.max() <= 8, path
    assert {p.suffix for p in ds.train.paths} == {".png", ".jpg", ".JPEG"}
    assert [ds.train.labels.count(k) for k in range(3)] == [4, 4, 4]
    assert [ds.val.labels.count(k) for k in range(3)] == [2, 2, 2]


def test_imagefolder_grayscale_becomes_rgb(tmp_path, make_cfg):
    written = write_imagefolder(tmp_path, per_class=(1, 1))
    gray_path, _, gray, _ = written["train"][0]
    ds = sources.load(make_cfg("data.source=imagefolder", f"data.root={tmp_path}").data)
    image = ds.train.image(ds.train.paths.index(gray_path))
    assert image.shape[0] == 3
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert torch.equal(image[0], torch.from_numpy(gray[..., 0]))


def test_imagefolder_classes_sorted_and_nested_files(tmp_path, make_cfg):
    write_imagefolder(tmp_path, classes=("zebra", "ant", "moth"), per_class=(2, 1))
    nested = tmp_path / "train" / "ant" / "more"
    nested.mkdir()
    (tmp_path / "train" / "ant" / "ant_000.png").rename(nested / "deep.png")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    ds = sources.load(make_cfg("data.source=imagefolder", f"data.root={tmp_path}").data)
    assert ds.classes == ["ant", "moth", "zebra"]
    assert nested / "deep.png" in ds.train.paths
    assert len(ds.train) == 6
    class_dirs = [p.relative_to(tmp_path / "train").parts[0] for p in ds.train.paths]
    assert class_dirs == [ds.classes[label] for label in ds.train.labels]


def test_imagefolder_val_class_not_in_train(tmp_path, make_cfg):
    write_imagefolder(tmp_path, per_class=(1, 1))
    (tmp_path / "val" / "wolf").mkdir()
    message = user_error(
        sources.load, make_cfg("data.source=imagefolder", f"data.root={tmp_path}").data
    )
    assert "wolf" in message


def test_imagefolder_missing_val(tmp_path, make_cfg):
    write_imagefolder(tmp_path, per_class=(1, 1))
    shutil.rmtree(tmp_path / "val")
    message = user_error(
        sources.load, make_cfg("data.source=imagefolder", f"data.root={tmp_path}").data
    )
    assert "val/" in message


def test_imagefolder_corrupt_file_names_it(tmp_path, make_cfg):
    write_imagefolder(tmp_path, per_class=(1, 1))
    bad = tmp_path / "train" / "dog" / "x.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
    cfg = make_cfg("data.source=imagefolder", f"data.root={tmp_path}", "data.on_error=raise",
                   "train.batch_size=4")  # fmt: skip
    loaders = data.build(cfg, Env())
    message = user_error(lambda: list(loaders.train))
    assert str(bad) in message and "data.on_error=skip" in message
    # The other files still decode.
    ds = sources.load(cfg.data)
    i = ds.train.paths.index(bad)
    assert all(ds.train.image(j).shape[0] == 3 for j in range(len(ds.train)) if j != i)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_name_their_samples_with_indices(tmp_path, make_cfg, workers):
    """data.build(indices=True): each batch says which samples it holds (what prediction over
    a dataset writes out): unreadable ones are not among them, and two ranks' eval batches name
    every sample once."""
    bad = write_bad_imagefolder(tmp_path)
    cfg = make_cfg("data.source=imagefolder", f"data.root={tmp_path}", "data.image_size=16",
                   "train.batch_size=5", f"data.workers={workers}")  # fmt: skip
    ds = sources.load(cfg.data)
    bad_index = {ds.train.paths.index(p) for p in bad}
    loaders = data.build(cfg, Env(), indices=True)
    seen = []
    for x, y, index in loaders.train:
        assert len(x) == len(y) == len(index)
        assert y.tolist() == [ds.train.labels[i] for i in index.tolist()]
        seen += index.tolist()
    assert len(seen) == len(set(seen)) == 18 and not bad_index & set(seen)
    val = []
    for rank in range(2):
        ranked = data.build(cfg, Env(rank=rank, world_size=2), indices=True)
        val += [i for _, _, index in ranked.val for i in index.tolist()]
    assert sorted(val) == list(range(len(ds.val)))


def write_bad_imagefolder(root) -> list:
    """An ImageFolder of 20 training images (12 × 20 px) and 3 val ones, two of the training
    files unreadable: a zero-byte PNG and a text file named .jpg."""
    write_imagefolder(root, per_class=(6, 1), size=12)
    empty, text = root / "train" / "cat" / "empty.png", root / "train" / "dog" / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("not an image\n")
    return [empty, text]


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_unreadable_files_are_skipped_and_counted(tmp_path, make_cfg, workers):
    bad = write_bad_imagefolder(tmp_path)

    def cfg(*extra: str):
        return make_cfg("data.source=imagefolder", f"data.root={tmp_path}", "data.image_size=16",
                        "train.batch_size=5", f"data.workers={workers}", *extra)  # fmt: skip

    ds = sources.load(cfg().data)
    bad_index = {ds.train.paths.index(p) for p in bad}
    loaders = data.build(cfg(), Env())
    order = list(loaders.train_order)
    batches = list(loaders.train)
    assert len(batches) == loaders.steps_per_epoch == len(order) == 4
    for (x, y), (_, batch) in zip(batches, order, strict=True):
        # Full batches but for the unreadable samples, left out; the rest in order.
        good = [i for i in batch.tolist() if i not in bad_index]
        assert y.tolist() == [ds.train.label(i) for i in good]
        assert x.shape == (len(good), 3, 16, 16)
    assert loaders.errors.skipped == 2
    assert all(any(str(p) in line for line in loaders.errors.recent) for p in bad)
    assert sum(len(y) for _, y in loaders.val) == 3 and loaders.errors.skipped == 2
    # Two ranks: the same number of steps on each, every unreadable file counted once.
    ranks = [data.build(cfg(), Env(rank=r, world_size=2)) for r in range(2)]
    assert [len(list(r.train)) for r in ranks] == [r.steps_per_epoch for r in ranks] == [2, 2]
    assert sum(r.errors.skipped for r in ranks) == 2
    # data.on_error=raise: the first unreadable file met stops the epoch, named in one line.
    first = next(i for batch in indices(order) for i in batch if i in bad_index)
    strict = data.build(cfg("data.on_error=raise"), Env())
    message = user_error(lambda: list(strict.train))
    assert str(ds.train.paths[first]) in message and "data.on_error=skip" in message


def test_a_batch_with_no_readable_sample():
    x, y, i = torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([1, 2]), torch.tensor([5, 6])
    good = (x, y, [], i)
    empty = (x[:0], y[:0], ["sample 7: bad", "sample 8: bad"], i[:0])
    errors = DataErrors()
    train = list(PolicyLoader([good, empty, good], errors, "skip", train=True, indices=True))
    # Training repeats the last good batch, so every rank keeps the same number of steps.
    assert len(train) == 3 and all(torch.equal(b, y) and torch.equal(j, i) for _, b, j in train)
    assert errors.skipped == 2 and errors.last == "sample 8: bad"
    assert len(list(PolicyLoader([good, empty, good], DataErrors(), "skip", train=False))) == 2
    assert all(len(batch) == 2 for batch in PolicyLoader([good], DataErrors(), "skip", True))
    first = PolicyLoader([empty, good], DataErrors(), "skip", train=True)
    assert "sample 7" in user_error(lambda: list(first))


@pytest.mark.timeout(120)
def test_cli_imagefolder_with_unreadable_files(tmp_path, capfd):
    from distnn.train import main

    bad = write_bad_imagefolder(tmp_path / "data")
    run = [f"run.dir={tmp_path / 'runs'}", *FAST, "data.source=imagefolder",
           f"data.root={tmp_path / 'data'}", "data.image_size=16", "train.batch_size=5",
           "train.epochs=1", "train.log_every=1"]  # fmt: skip
    main([*run, "run.name=skip"])
    assert (tmp_path / "runs" / "skip" / "summary.json").is_file()
    train_records = [m for m in read_metrics(tmp_path / "runs" / "skip") if "loss" in m]
    assert len(train_records) == 4 and train_records[-1]["data_errors"] == 2
    line = one_line_error(main, [*run, "run.name=raise", "data.on_error=raise"], capfd)
    assert any(str(p) in line for p in bad) and "data.on_error=skip" in line


# --- synthetic ------------------------------------------------------------------------------


def test_synthetic_sizes_and_repeatable(make_cfg):
    cfg = make_cfg(
        "data.synthetic_train=40",
        "data.synthetic_val=12",
        "data.synthetic_classes=5",
        "data.image_size=24",
    )
    a, b = sources.load(cfg.data), sources.load(cfg.data)
    assert (len(a.train), len(a.val)) == (40, 12)
    assert a.classes == [f"class_{i}" for i in range(5)]
    assert a.train.image(0).shape == (3, 24, 24)
    assert a.train.images.dtype == torch.uint8
    labels = {a.train.label(i) for i in range(40)}
    assert labels <= set(range(5)) and len(labels) > 1
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.train.images[:12], a.val.images)  # the splits differ


# --- loaders and sample order ---------------------------------------------------------------

N_TRAIN, N_VAL, SIZE = 64, 21, 16


def synthetic_cfg(make_cfg, batch: int, *extra: str):
    return make_cfg(
        f"data.synthetic_train={N_TRAIN}",
        f"data.synthetic_val={N_VAL}",
        f"data.image_size={SIZE}",
        f"train.batch_size={batch}",
        "train.seed=5",
        *extra,
    )


def indices(batches) -> list[list[int]]:
    """The sample indices of an order's (epoch, indices) batches."""
    return [batch.tolist() for _, batch in batches]


@pytest.mark.parametrize("hflip", [True, False])
def test_train_loader_batches(make_cfg, hflip):
    cfg = synthetic_cfg(make_cfg, 8, f"data.hflip={hflip}")
    loaders = data.build(cfg, Env())
    assert loaders.steps_per_epoch == N_TRAIN // 8
    assert (loaders.train_size, loaders.val_size) == (N_TRAIN, N_VAL)
    assert len(loaders.train) == loaders.steps_per_epoch
    ds = sources.load(cfg.data)
    transform = TrainTransform(SIZE, cfg.train.seed, hflip=hflip)
    order = list(loaders.train_order)
    batches = list(loaders.train)
    assert len(batches) == loaders.steps_per_epoch == len(order)
    for (x, y), (epoch, batch) in zip(batches, order, strict=True):
        assert x.dtype == torch.uint8 and x.shape == (8, 3, SIZE, SIZE)
        assert y.dtype == torch.int64 and y.shape == (8,)
        # Each row is the sample the order names, augmented for its (index, epoch).
        assert y.tolist() == [ds.train.label(i) for i in batch.tolist()]
        for row, i in zip(x, batch.tolist(), strict=True):
            assert torch.equal(row, transform(ds.train.image(i), i, epoch))
    seen = [i for batch in indices(order) for i in batch]
    assert sorted(seen) == list(range(N_TRAIN))  # 64 / 8: one whole pass, no repeats
    val = list(loaders.val)
    assert [len(y) for _, y in val] == [8, 8, 5]
    assert torch.equal(torch.cat([x for x, _ in val]), ds.val.images)  # 16 px: no resize


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_split_the_single_process_batch(make_cfg, accum):
    b = 4
    single = data.build(synthetic_cfg(make_cfg, 2 * b, f"train.accum_steps={accum}"), Env())
    ranks = [
        data.build(
            synthetic_cfg(make_cfg, b, f"train.accum_steps={accum}"),
            Env(rank=r, world_size=2),
        )
        for r in range(2)
    ]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == single.steps_per_epoch
    for epoch in (0, 3):
        for loaders in (single, *ranks):
            loaders.train_order.set_epoch(epoch)
        whole = list(single.train_order)
        per_rank = [list(loaders.train_order) for loaders in ranks]
        assert len(whole) == single.steps_per_epoch
        assert {e for e, _ in whole} | {e for rank in per_rank for e, _ in rank} == {epoch}
        for t, batch in enumerate(indices(whole)):
            r0, r1 = set(indices(per_rank[0])[t]), set(indices(per_rank[1])[t])
            assert len(r0) == len(r1) == b
            assert not r0 & r1
            assert r0 | r1 == set(batch)


def test_epochs_differ_and_resume_yields_the_tail():
    order = TrainBatches(50, 4, 1, 0, seed=7)
    assert order.steps == 12
    epochs = []
    for epoch in range(3):
        order.set_epoch(epoch)
        batches = list(order)
        assert len(batches) == len(order) == 12
        flat = [i for b in indices(batches) for i in b]
        assert len(set(flat)) == 48 and set(flat) <= set(range(50))
        epochs.append(flat)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    for epoch, k in ((1, 0), (1, 5), (2, 11), (2, 12)):
        order.set_epoch(epoch)
        full = list(order)
        order.set_epoch(epoch, start_batch=k)
        assert len(order) == 12 - k
        assert indices(order) == indices(full[k:])
    # Same seed, same epoch: the same order in a new sampler; another seed: another order.
    again = TrainBatches(50, 4, 1, 0, seed=7)
    again.set_epoch(2)
    assert [i for b in indices(again) for i in b] == epochs[2]
    other = TrainBatches(50, 4, 1, 0, seed=8)
    other.set_epoch(2)
    assert [i for b in indices(other) for i in b] != epochs[2]


def test_resume_through_the_loader(make_cfg):
    loaders = data.build(synthetic_cfg(make_cfg, 8), Env())
    loaders.train_order.set_epoch(2)
    full = list(loaders.train)
    loaders.train_order.set_epoch(2, start_batch=5)
    assert len(loaders.train) == loaders.steps_per_epoch - 5
    tail = list(loaders.train)
    assert len(tail) == len(full) - 5
    for (x, y), (fx, fy) in zip(tail, full[5:], strict=True):
        assert torch.equal(x, fx) and torch.equal(y, fy)


@pytest.mark.parametrize(("n", "world", "batch"), [(21, 2, 4), (21, 3, 5), (7, 4, 8), (1, 2, 3)])
def test_eval_orders_cover_every_sample_once(n, world, batch):
    seen = []
    for rank in range(world):
        order = EvalBatches(n, batch, world, rank)
        batches = list(order)
        assert len(batches) == len(order)
        assert all(0 < len(b) <= batch for _, b in batches)
        assert all(epoch == 0 for epoch, _ in batches)
        seen += [i for b in indices(batches) for i in b]
    assert sorted(seen) == list(range(n))


def test_eval_loaders_across_ranks(make_cfg):
    ds = sources.load(synthetic_cfg(make_cfg, 4).data)
    labels = {}
    for rank in range(2):
        loaders = data.build(synthetic_cfg(make_cfg, 4), Env(rank=rank, world_size=2))
        for (_, batch), (x, y) in zip(loaders.val.loader.sampler, loaders.val, strict=True):
            for i, row, label in zip(batch.tolist(), x, y.tolist(), strict=True):
                assert i not in labels
                labels[i] = label
                assert torch.equal(row, ds.val.image(i))
    assert labels == {i: ds.val.label(i) for i in range(N_VAL)}


def test_no_full_global_batch_is_a_user_error(make_cfg):
    cfg = synthetic_cfg(make_cfg, 40)
    message = user_error(data.build, cfg, Env(rank=0, world_size=2))
    assert "train.batch_size" in message and "80" in message


# --- augmentation ---------------------------------------------------------------------------


def test_train_transform_is_a_function_of_index_and_epoch():
    img = torch.randint(
        0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    transform = TrainTransform(32, seed=1)
    outs = {(i, e): transform(img, i, e) for i in range(8) for e in range(3)}
    for (i, e), out in outs.items():
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        assert torch.equal(out, TrainTransform(32, seed=1)(img, i, e))
    # It augments: not every output is the input, and they are not all alike.
    distinct = {out.numpy().tobytes() for out in outs.values()}
    assert len(distinct) > 8
    assert not all(torch.equal(out, img) for out in outs.values())
    # Another seed, another augmentation for some sample.
    other = TrainTransform(32, seed=2)
    assert any(not torch.equal(out, other(img, i, e)) for (i, e), out in outs.items())


def test_hflip_off_only_removes_the_flip():
    gen = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=gen)
    on, off = TrainTransform(32, seed=4), TrainTransform(32, seed=4, hflip=False)
    flipped = 0
    for i in range(16):
        a, b = on(img, i, 0), off(img, i, 0)
        if not torch.equal(a, b):
            assert torch.equal(a, F.horizontal_flip(b))  # same crop, mirrored
            flipped += 1
    assert 0 < flipped < 16


def test_workers_yield_the_same_batches(make_cfg):
    main = data.build(synthetic_cfg(make_cfg, 8, "data.workers=0"), Env())
    workers = data.build(synthetic_cfg(make_cfg, 8, "data.workers=2"), Env())
    assert workers.train.num_workers == 2
    for loaders in (main, workers):
        loaders.train_order.set_epoch(1)
    x0, y0 = next(iter(main.train))
    it = iter(workers.train)
    x1, y1 = next(it)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # The second batch comes from the other worker: it matches too.
    x0b, _ = list(main.train)[1]
    x1b, _ = next(it)
    assert torch.equal(x0b, x1b)
    del it


# --- large images -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 300, 400), (3, 12, 400), (3, 500, 9)])
def test_224_transforms(shape):
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    train = TrainTransform(224, seed=0)
    for i in range(6):
        out = train(img, i, 0)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
        assert torch.equal(out, train(img, i, 0))
    out = EvalTransform(224)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8


def test_eval_transform_224_is_resize_256_centre_crop():
    gen = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=gen)
    assert torch.equal(EvalTransform(224)(img), img[:, 16:240, 16:240])
    tall = torch.randint(0, 256, (3, 400, 300), dtype=torch.uint8, generator=gen)
    expected = F.center_crop(F.resize(tall, [341, 256], antialias=True), [224, 224])
    assert torch.equal(EvalTransform(224)(tall), expected)


def test_constant_image_stays_constant_at_224():
    img = torch.full((3, 300, 400), 77, dtype=torch.uint8)
    for i in range(4):
        assert (TrainTransform(224, seed=3)(img, i, 0) == 77).all()
    assert (EvalTransform(224)(img) == 77).all()
