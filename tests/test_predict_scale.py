"""Prediction and evaluation of whole datasets on 1-3 ranks: every sample once, the same file at
any world size, a killed job resumed without recomputing its parts, reports that agree with
training's own evaluation."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distnn import storage
from distnn.evaluate import main as evaluate
from distnn.predict import main as predict
from tests.conftest import last_eval, one_line_error, run_cli, torchrun
from tests.object_store import BUCKET, S3Server

VAL = 359  # the digits' val split: 3 shards of 150, 150, 59
PARTS = ["--batch-size", "8", "--part-size", "16"]  # 23 parts: a split no world size divides


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert [x[f"class_{k}"] for k in (1, 2, 3)] == [y[f"class_{k}"] for k in (1, 2, 3)]
        for k in (1, 2, 3):
            assert float(x[f"prob_{k}"]) == pytest.approx(float(y[f"prob_{k}"]), abs=1e-6)


@pytest.fixture(scope="module")
def two_rank_file(digits_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "preds.csv"
    r = torchrun(2, "-m", "distnn.predict", "--checkpoint", str(digits_run), "--output",
                 str(out), *PARTS, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.timeout(400)
def test_one_two_and_three_ranks_write_the_same_file(digits_run, two_rank_file, tmp_path):
    predict(["--checkpoint", str(digits_run), "--output", str(tmp_path / "one.csv"), *PARTS])
    three = tmp_path / "three.csv"
    r = torchrun(3, "-m", "distnn.predict", "--checkpoint", str(digits_run), "--output",
                 str(three), *PARTS, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    one = read_csv(tmp_path / "one.csv")
    assert len(one) == VAL and len({r["key"] for r in one}) == VAL
    assert one[0]["key"].endswith(".tar:0") and all(r["label"] for r in one)
    assert list(one[0]) == ["key", "label", "class_1", "prob_1", "class_2", "prob_2",
                            "class_3", "prob_3", "error"]  # fmt: skip
    for other in (two_rank_file, three):
        assert_same_rows(one, read_csv(other))
    # The predictions are the trained model's: top-1 over the file is the run's val_top1.
    top1 = sum(r["class_1"] == r["label"] for r in one) / VAL
    assert top1 == pytest.approx(last_eval(digits_run)["val_top1"], abs=1e-9)


@pytest.mark.timeout(400)
def test_a_killed_job_resumes_without_recomputing_its_parts(digits_run, two_rank_file, tmp_path):
    out = tmp_path / "preds.csv"
    args = ["-m", "distnn.predict", "--checkpoint", str(digits_run), "--output", str(out), *PARTS]
    # Rank 1 SIGKILLs itself after its 5th batch (its 3rd part begun); torchrun ends rank 0.
    env = {**os.environ, "DISTNN_FAULT": "kill@step:5,rank:1"}
    r = torchrun(2, *args, env=env, timeout=240)
    assert r.returncode != 0 and not out.exists()
    parts = sorted((tmp_path / "preds.csv.parts").glob("part_*.jsonl"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts}
    assert 2 <= len(before) < 23 and "part_000001.jsonl" in before  # rank 1's first part
    r = torchrun(2, *args, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    line = re.search(r"predict: (\d+) of 23 parts already in .*; predicting (\d+) parts", r.stderr)
    assert line is not None and int(line[1]) == len(before) and int(line[2]) == 23 - len(before)
    for p in parts:  # not rewritten
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == before[p.name]
    assert out.read_bytes() == two_rank_file.read_bytes()


def test_parquet_and_jsonl_hold_every_probability(digits_run, tmp_path):
    base = ["--checkpoint", str(digits_run), "--topk", "2", "--save-probs", "--batch-size", "64"]
    predict([*base, "--output", str(tmp_path / "p.parquet")])
    predict([*base, "--output", str(tmp_path / "p.jsonl"), "--tta", "hflip"])
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert len(table) == VAL and list(table[0]) == [
        "key", "label", "class_1", "prob_1", "class_2", "prob_2", "error", "probs"]  # fmt: skip
    for row in table:
        probs = row["probs"]
        assert len(probs) == 10 and sum(probs) == pytest.approx(1, abs=1e-5)
        assert row["prob_1"] == pytest.approx(max(probs)) and row["prob_1"] >= row["prob_2"]
        assert str(probs.index(max(probs))) == row["class_1"]  # digits' classes are "0".."9"
    flipped = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["key"] for r in flipped] == [r["key"] for r in table]
    # hflip averages two views: other probabilities, mostly the same answers.
    assert any(abs(a["prob_1"] - b["prob_1"]) > 1e-4 for a, b in zip(flipped, table, strict=True))
    same = sum(a["class_1"] == b["class_1"] for a, b in zip(flipped, table, strict=True))
    assert same > VAL * 0.5
    # five-crop: 5 views of the image enlarged by 1/0.875, their probabilities averaged.
    predict([*base, "--output", str(tmp_path / "five.jsonl"), "--tta", "five-crop"])
    five = [json.loads(line) for line in (tmp_path / "five.jsonl").read_text().splitlines()]
    assert len(five) == VAL and all(sum(r["probs"]) == pytest.approx(1, abs=1e-5) for r in five)
    assert any(abs(a["prob_1"] - b["prob_1"]) > 1e-4 for a, b in zip(five, table, strict=True))


def test_unreadable_files_are_listed_or_stop_the_job(digits_run, digits_shards, tmp_path, capfd):
    folder = tmp_path / "images" / "7"  # named after a class: labelled 7
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 200, 30)).save(folder / f"{i}.png")
    (folder / "1b.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "p.csv"
    predict(["--checkpoint", str(digits_run), "--output", str(out), str(tmp_path / "images")])
    rows = read_csv(out)
    assert [Path(r["key"]).name for r in rows] == ["0.png", "1.png", "1b.png", "2.png"]
    bad = rows[2]
    assert bad["class_1"] == bad["label"] == "" and "1b.png" not in bad["error"] and bad["error"]
    assert all(r["label"] == "7" for r in rows[:2] + rows[3:])
    assert all(r["error"] == "" and r["class_1"] for r in rows[:2] + rows[3:])
    line = one_line_error(predict, ["--checkpoint", str(digits_run), "data.on_error=raise",
                                    str(tmp_path / "images")], capfd)  # fmt: skip
    assert "1b.png" in line and "data.on_error=skip" in line
    # Parts of another prediction are not mixed into this one.
    line = one_line_error(predict, ["--checkpoint", str(digits_run), "--output", str(out),
                                    "--topk", "5", str(tmp_path / "images")], capfd)  # fmt: skip
    assert "p.csv.parts holds parts of another prediction (topk: 3 then, 5 now)" in line


@pytest.mark.timeout(400)
def test_evaluate_agrees_with_training_on_one_and_two_ranks(digits_run, tmp_path):
    report = evaluate(["--checkpoint", str(digits_run), "--output", str(tmp_path / "one")])
    trained = last_eval(digits_run)
    assert report["samples"] == VAL
    assert report["top1"] == trained["val_top1"]  # exactly: the same samples, same transform
    assert report["top5"] == trained["val_top5"]
    assert report["loss"] == pytest.approx(trained["val_loss"], rel=1e-5)
    confusion = json.loads((tmp_path / "one" / "report.json").read_text())
    assert confusion["top1"] == report["top1"]
    support = sum(c["support"] for c in report["per_class"])
    recall_hits = sum(c["recall"] * c["support"] for c in report["per_class"])
    assert support == VAL and recall_hits / VAL == pytest.approx(report["top1"])  # diagonal / n
    assert 0 <= report["ece"] < 1 and sum(report["calibration"]["count"]) == VAL
    for name, size in (("confusion", (800, 800)), ("reliability", (600, 600)),
                       ("hardest", (800, 800))):  # fmt: skip
        with Image.open(tmp_path / "one" / f"{name}.png") as im:
            assert im.format == "PNG" and im.size == size
            assert len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn on, not blank
    r = torchrun(2, "-m", "distnn.evaluate", "--checkpoint", str(digits_run), "--output",
                 str(tmp_path / "two"), timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["top1"] == report["top1"] and two["samples"] == VAL
    assert two["loss"] == pytest.approx(report["loss"], rel=1e-6)


@pytest.mark.timeout(400)
def test_shards_in_s3_predicted_into_s3(digits_run, digits_shards, two_rank_file, tmp_path):
    """Inputs and output both in object storage (moto's S3 server through s3fs): the same file
    as from the local shards, parts and all as objects."""
    s3 = S3Server(tmp_path / "moto.log", digits_shards, "digits")
    try:
        url = f"s3://{BUCKET}/predictions/preds.csv"
        r = torchrun(2, "-m", "distnn.predict", "--checkpoint", str(digits_run), "--output", url,
                     *PARTS, "data.source=shards", f"data.root={s3.root}",
                     f"data.cache_dir={tmp_path / 'cache'}", env={**os.environ, **s3.env},
                     timeout=240)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        store = storage.Remote(f"s3://{BUCKET}/predictions")
        with mock.patch.dict(os.environ, s3.env):
            assert store.read("preds.csv") == two_rank_file.read_bytes()
            assert store.size("preds.csv.parts/part_000022.jsonl")
    finally:
        s3.stop()


def test_evaluate_reports_to_the_runs_tensorboard_and_wandb(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distnn import config
    from distnn.monitor import wandb_reader
    from distnn.train import train

    cfg = config.load(None, [f"run.dir={tmp_path}", "run.name=tracked", "data.workers=0",
                             "log.progress=off", "log.wandb.mode=offline", "train.max_steps=4",
                             "data.synthetic_train=128", "data.synthetic_val=48",
                             "train.batch_size=32"])  # fmt: skip
    train(cfg)
    report = evaluate(["--checkpoint", str(cfg.run_dir)])
    assert (cfg.run_dir / "evaluate" / "report.json").is_file() and report["samples"] == 48
    acc = EventAccumulator(str(cfg.run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    top1 = acc.Scalars("evaluate/top1")
    assert [(e.step, e.value) for e in top1] == [(4, pytest.approx(report["top1"]))]
    assert {"evaluate/confusion", "evaluate/reliability", "evaluate/hardest"} <= set(
        acc.Tags()["images"])  # fmt: skip
    confusion = acc.Images("evaluate/confusion")[0]
    assert (confusion.width, confusion.height) == (800, 800)
    runs = sorted((cfg.run_dir / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    rows = wandb_reader.history(runs[-1])
    logged = [r for r in rows if "evaluate/top1" in r]
    assert len(logged) == 1 and logged[0]["evaluate/top1"] == pytest.approx(report["top1"])
    assert logged[0]["evaluate/confusion"]["_type"] == "image-file"
    assert wandb_reader.run_info(runs[-1])["id"] == wandb_reader.run_info(runs[0])["id"]


def test_the_predict_benchmark_writes_both_rows(tmp_path):
    r = run_cli("-m", "benchmarks.predict_throughput", "--quick", "--repeats=1",
                f"--out={tmp_path}", timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "predict_throughput.json").read_text())["rows"]
    assert [(row["samples"], row["batch"]) for row in rows] == [(VAL, 64), (48, 16)]
    assert all(row[f"ranks_{n}_samples_per_s"]["median"] > 0 for row in rows for n in (1, 2))
    assert "| digits shards, 32 px | 359 | 64 |" in (tmp_path / "predict_throughput.md").read_text()


@pytest.mark.parametrize("n, batch", [(359, 256), (359, 8), (5000, 256), (1, 4)])
def test_parts_deal_every_sample_once_at_any_world_size(n, batch):
    from distnn.data.order import Parts, part_size

    size = part_size(n, batch)
    assert 1 <= size <= min(4096, max(batch, -(-n // 1024)))
    assert -(-n // size) >= min(64, n)  # enough parts for 64 ranks where there are samples
    for world in (1, 2, 3, 7):
        ranks = [Parts(n, batch, size, world, r) for r in range(world)]
        seen = np.concatenate([b for p in ranks for _, b in p])
        assert sorted(seen.tolist()) == list(range(n))  # once each, nothing padded
        assert sum(len(p) for p in ranks) == sum(1 for p in ranks for _ in p)
        for p in ranks:
            for _, b in p:  # a batch never crosses a part and holds consecutive samples
                assert b[0] // size == b[-1] // size and (np.diff(b) == 1).all()
                assert len(b) <= batch
    skipped = Parts(n, batch, size, 2, 0, done=frozenset({0}))
    assert all(b[0] >= size for _, b in skipped)  # a rerun skips the parts already written
