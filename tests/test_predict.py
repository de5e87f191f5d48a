"""Predict from a checkpoint of a short real run, in-process and as a user runs it."""

from __future__ import annotations

import pytest
from PIL import Image

from distnn import config, data
from distnn.parallel.env import Env
from distnn.predict import main as predict
from distnn.train import train
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    cfg = config.load(
        None,
        [f"run.dir={root}", "run.name=p", "data.workers=0", "log.progress=off",
         "train.epochs=2", "train.batch_size=64", "optim.lr=0.05", "log.wandb.mode=disabled"],
    )  # fmt: skip
    train(cfg)
    # Held-out images as PNG files (lossless), in ImageFolder layout so predict can tell truth.
    loaders = data.build(cfg, Env())
    split = data.sources.load(cfg.data).val
    paths, truth = [], []
    for i in range(20):
        label = loaders.classes[split.label(i)]
        path = root / "val" / label / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.image(i).permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
        truth.append(label)
    return cfg, paths, truth


def test_predict_names_the_trained_classes(run_and_images, capsys):
    cfg, paths, truth = run_and_images
    results = predict(["--checkpoint", str(cfg.run_dir), "--topk", "3", *map(str, paths)])
    top1 = [r["class_1"] for r in results]
    assert sum(p == t for p, t in zip(top1, truth, strict=True)) >= 18
    assert [r["label"] for r in results] == truth  # from the ImageFolder layout
    for r in results:
        probs = [r[f"prob_{k}"] for k in (1, 2, 3)]
        assert "prob_4" not in r and probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-6
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 20 and f"(true: {truth[0]})" in out[0] and top1[0] in out[0]


def test_predict_lists_or_rejects_an_unreadable_image(run_and_images, tmp_path):
    cfg, paths, _ = run_and_images
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    r = run_cli("-m", "distnn.predict", "--checkpoint", str(cfg.run_dir), str(paths[0]), str(bad))
    assert r.returncode == 0, r.stderr[-2000:]  # data.on_error=skip: listed with the reason
    assert r.stdout.splitlines()[1].startswith(f"{bad}: unreadable: ")  # in the given order
    r = run_cli("-m", "distnn.predict", "--checkpoint", str(cfg.run_dir), str(paths[0]), str(bad),
                "data.on_error=raise")  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
