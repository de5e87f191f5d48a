"""Augmentation policies (data.augment, data.color_jitter, data.random_erasing): pure functions
of (seed, epoch, sample index) that leave the global RNG alone, one path for batches and single
samples, and a training run that gives the same weights with and without worker processes."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from distnn import config, data
from distnn.data import manifest as mf
from distnn.data import shard as sharder
from distnn.data.augment import Augment
from distnn.data.sources import CIFAR_MEAN, CIFAR_STD, decode
from distnn.data.transforms import TrainTransform
from distnn.errors import UserError
from distnn.parallel.env import Env
from distnn.train import train
from tests.conftest import assert_same_params, final_weights, write_cifar

STEPS = {
    "randaugment": ["data.augment=randaugment"],
    "trivialaugment": ["data.augment=trivialaugment"],
    "autoaugment": ["data.augment=autoaugment"],
    "augmix": ["data.augment=augmix"],
    "jitter": ["data.color_jitter=0.4"],
    "erasing": ["data.random_erasing=1"],
}


def images(n: int, size: int = 32, seed: int = 0) -> list:
    """n random H × W × 3 uint8 images, as the decoder gives them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy()
            for _ in range(n)]  # fmt: skip


def transform(make_cfg, *overrides: str, size: int = 32, seed: int = 3) -> TrainTransform:
    d = make_cfg(f"data.image_size={size}", *overrides).data
    return TrainTransform(size, seed, augment=Augment.from_config(d, CIFAR_MEAN))


def test_basic_adds_nothing_to_crop_and_flip(make_cfg):
    assert transform(make_cfg).augment is None
    assert transform(make_cfg, "data.augment=randaugment").augment is not None


@pytest.mark.parametrize("size", [32, 96])
@pytest.mark.parametrize("step", list(STEPS))
def test_each_step_is_a_pure_function_of_seed_epoch_index(make_cfg, step, size):
    batch, indices = images(8, size), list(range(10, 18))
    basic = transform(make_cfg, size=size).batch(batch, indices, 2)
    t = transform(make_cfg, *STEPS[step], size=size)
    state = torch.get_rng_state()
    x = t.batch(batch, indices, 2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's draws are untouched
    assert x.shape == (8, 3, size, size) and x.dtype == torch.uint8
    # It changes images beyond crop + flip.
    assert sum(not torch.equal(a, b) for a, b in zip(x, basic, strict=True)) >= 4
    # The same (seed, epoch, index): the same pixels, in a new transform, after a pickle (a
    # spawned worker), whatever the global RNG holds.
    torch.manual_seed(12345)
    assert torch.equal(x, t.batch(batch, indices, 2))
    assert torch.equal(x, pickle.loads(pickle.dumps(t)).batch(batch, indices, 2))
    assert torch.equal(x, transform(make_cfg, *STEPS[step], size=size).batch(batch, indices, 2))
    # Another index, epoch or seed: other pixels.
    assert not torch.equal(x[0], t.batch(batch[:1], [99], 2)[0])
    assert not torch.equal(x[0], t.batch(batch[:1], indices[:1], 3)[0])
    other = transform(make_cfg, *STEPS[step], size=size, seed=4)
    assert not torch.equal(x[0], other.batch(batch[:1], indices[:1], 2)[0])


def test_autoaugment_policy_follows_the_image_size():
    def policy(size: int) -> object:
        return Augment(size, "autoaugment").steps.transforms[0].policy

    assert policy(32).value == "cifar10" and policy(64).value == "cifar10"
    assert policy(65).value == "imagenet" and policy(224).value == "imagenet"


def test_erased_pixels_are_the_mean(make_cfg):
    fill = torch.tensor([round(m) for m in CIFAR_MEAN])
    # Normalised on the device, they are (about) 0, as the recipe that erases after Normalize.
    normalised = (fill - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    assert normalised.abs().max() < 0.5 / 60
    t = transform(make_cfg, "data.random_erasing=1", "data.hflip=false")
    white = [torch.full((32, 32, 3), 255, dtype=torch.uint8).numpy()] * 16
    x = t.batch(white, list(range(16)), 0)
    boxes = set()
    for image in x:
        erased = (image == fill[:, None, None]).all(0)
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        assert len(rows) and len(cols)
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert erased[top:bottom, left:right].all()  # one rectangle
        assert erased.sum() == (bottom - top) * (right - left)
        # Outside it, the image and the crop's zero padding, untouched.
        assert ((image == 255) | (image == 0)).all(0)[~erased].all()
        boxes.add((int(top), int(bottom), int(left), int(right)))
    assert len(boxes) > 8  # each sample its own rectangle


def test_basic_is_the_cifar_recipe_from_the_sample_rng():
    """augment=basic pins today's pixels: zero-pad 4, crop at (randint, randint), then flip if
    random() < 0.5, drawn from random.Random("seed:epoch:index")."""
    batch, indices = images(6, seed=1), [5, 0, 77, 3, 1000, 12]
    x = TrainTransform(32, seed=7).batch(batch, indices, 4)
    for row, img, i in zip(x, batch, indices, strict=True):
        rng = random.Random(f"7:4:{i}")
        padded = F.pad(torch.from_numpy(img).permute(2, 0, 1), [4])
        top, left = rng.randint(0, 8), rng.randint(0, 8)
        want = padded[:, top : top + 32, left : left + 32]
        want = F.horizontal_flip(want) if rng.random() < 0.5 else want
        assert torch.equal(row, want)


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory):
    """40 train + 8 test CIFAR-10 samples in shards of 16, made by the sharder's CLI entry."""
    root = tmp_path_factory.mktemp("augment")
    write_cifar(root / "src", "cifar10", per_batch=8, seed=2)
    sharder.main(["cifar10", str(root / "src"), str(root / "out"), "--max-count=16"])
    return root / "out"


@pytest.mark.parametrize(
    "overrides",
    [[], ["data.augment=randaugment", "data.random_erasing=0.5", "data.color_jitter=0.3"]],
    ids=["basic", "randaugment+jitter+erasing"],
)
def test_shard_batches_equal_single_samples(make_cfg, cifar_shards, overrides):
    cfg = make_cfg("data.source=shards", f"data.root={cifar_shards}", "train.batch_size=8",
                   "train.seed=1", *overrides)  # fmt: skip
    loaders = data.build(cfg, Env())
    reader = loaders.train.loader.dataset
    m = mf.load(cifar_shards)
    single = TrainTransform(32, 1, augment=Augment.from_config(cfg.data, m.mean))
    loaders.train_order.set_epoch(1)
    rows = 0
    for (epoch, items), (x, _) in zip(loaders.train_order, loaders.train, strict=True):
        for row, g in zip(x, items.tolist(), strict=True):
            image = decode(reader.split.sample(g)[0])
            assert torch.equal(row, single(image, g, epoch))
            rows += 1
    assert rows == loaders.steps_per_epoch * 8 == 40


@pytest.mark.timeout(180)
def test_training_with_policies_matches_across_workers(tmp_path):
    """alexnet_cifar has dropout: augmentation in the training process (workers=0) must not
    move the RNG its masks come from."""
    summaries = {}
    for workers in (0, 1):
        cfg = config.load(None, [
            f"run.dir={tmp_path}", f"run.name=w{workers}", f"data.workers={workers}",
            "log.progress=off", "log.wandb.mode=disabled", "model.name=alexnet_cifar",
            "data.image_size=16", "data.synthetic_train=32", "data.synthetic_val=8",
            "train.batch_size=8", "train.epochs=2", "data.augment=randaugment",
            "data.random_erasing=0.25", "data.color_jitter=0.4",
        ])  # fmt: skip
        summaries[workers] = train(cfg)
    assert summaries[0]["steps"] == 8
    assert summaries[0]["train_loss"] == summaries[1]["train_loss"]
    assert_same_params(final_weights(tmp_path / "w0"), final_weights(tmp_path / "w1"), 0, 0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.augment=cutout"], "data.augment"),
        (["data.augment_ops=0"], "data.augment_ops"),
        (["data.augment=randaugment", "data.augment_magnitude=31"], "data.augment_magnitude"),
        (["data.augment=augmix", "data.augment_magnitude=0"], "data.augment_magnitude"),
        (["data.random_erasing=1.5"], "data.random_erasing"),
        (["data.random_erasing=-0.1"], "data.random_erasing"),
        (["data.color_jitter=-0.4"], "data.color_jitter"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(overrides, key):
    with pytest.raises(UserError) as info:
        config.load(None, overrides)
    message = str(info.value)
    assert "\n" not in message and key in message
    assert overrides[-1].split("=")[1] in message
