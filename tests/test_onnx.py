"""ONNX export (torch.onnx's dynamo exporter) checked by onnxruntime, and predict through it:
the same top-1 on the digits val set as torch, for the zoo's CNN and ResNet-18 and a timm
model."""

from __future__ import annotations

import csv
import json

import pytest

from distnn.checkpoint import main as checkpoint_cli
from distnn.predict import main as predict
from tests.conftest import digits_trained, last_eval, one_line_error


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", ["tutorial_cnn", "resnet18", "timm:mobilenetv3_small_050"])
def test_onnx_export_predicts_what_torch_predicts(model, tmp_path_factory, digits_shards, tmp_path):
    run = digits_trained(tmp_path_factory, digits_shards, model, "train.max_steps=3",
                         "train.batch_size=16")  # fmt: skip
    out = tmp_path / "model.onnx"
    checkpoint_cli(["export", str(run), str(out)])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["format"] == "onnx" and meta["max_abs_diff"] <= 1e-3
    assert meta["preprocessing"]["mean"] == meta["mean"] and meta["image_size"] == 32
    predict(["--checkpoint", str(run), "--output", str(tmp_path / "torch.csv")])
    predict(["--checkpoint", str(out), "--output", str(tmp_path / "onnx.csv"), "--batch-size", "7"])
    by_torch, by_onnx = rows(tmp_path / "torch.csv"), rows(tmp_path / "onnx.csv")
    assert len(by_onnx) == 359
    top1 = [sum(r["class_1"] == r["label"] for r in t) / 359 for t in (by_torch, by_onnx)]
    assert top1[0] == top1[1] == pytest.approx(last_eval(run)["val_top1"], abs=1e-9)
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert a["key"] == b["key"] and a["class_1"] == b["class_1"]
        assert float(a["prob_1"]) == pytest.approx(float(b["prob_1"]), abs=1e-4)


def test_an_onnx_export_is_named_onnx_or_safetensors(digits_run, tmp_path, capfd):
    line = one_line_error(checkpoint_cli, ["export", str(digits_run), str(tmp_path / "m.pt")],
                          capfd)  # fmt: skip
    assert "*.safetensors or *.onnx, not" in line
