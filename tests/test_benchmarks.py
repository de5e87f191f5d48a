"""`make bench` in quick mode (`python -m benchmarks.run --quick`): every benchmark runs end to
end into a fresh folder, writes JSON of the documented shape, a table, a plot, and
results/README.md. The figures' values are not checked (speed is not a unit test), their
shape and consistency are: medians between min and max, one value per repeat, ratios that are
the ratios of the figures beside them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from distnn.precision import cpu_has_bf16
from tests.conftest import ROOT, run_cli

MACHINE = {"cpu", "cpu_flags", "cores", "gpu", "platform", "python", "torch", "torchvision",
           "webdataset", "pillow", "git_commit", "git_describe", "load_avg_start", "load_avg_end",
           "date"}  # fmt: skip
STATS = {"median", "min", "max", "runs"}


def stats(value: dict, repeats: int | None = None) -> dict:
    assert value.keys() == STATS, value.keys()
    assert value["min"] <= value["median"] <= value["max"]
    assert sorted(value["runs"])[0] == value["min"] and max(value["runs"]) == value["max"]
    if repeats is not None:
        assert len(value["runs"]) == repeats
    return value


def check_data(doc: dict) -> None:
    kinds = {(r["data"], r["pipeline"], r["workers"]) for r in doc["rows"]}
    assert {w for *_, w in kinds} == {1, 2}
    assert {d for d, *_ in kinds} == {"32px PNG", "ImageNet-like JPEG"}
    for r in doc["rows"]:
        stats({k: r[k] for k in STATS}, doc["repeats"])
        assert r["median"] > 0
    by = {(r["data"], r["pipeline"], r["workers"]): r["median"] for r in doc["rows"]}
    for q in doc["ratios"]:
        shards = by[(q["data"], "shards", q["workers"])]
        want = shards / by[(q["data"], "torchvision ImageFolder", q["workers"])]
        assert q["vs_imagefolder"] == pytest.approx(want)


def check_train(doc: dict) -> None:
    models = {r["model"] for r in doc["compare"]}
    assert {"linear", "tutorial_cnn", "resnet18"} <= models  # resnet50 224 px: full runs only
    for r in doc["compare"]:
        assert r["order"] == "ABBA"
        for key in ("distnn", "bare", "ratio", "overhead_us_per_step"):
            stats(r[key], doc["repeats"])
        pairs = zip(r["distnn"]["runs"], r["bare"]["runs"], strict=True)
        assert r["ratio"]["runs"] == pytest.approx([a / b for a, b in pairs])
        # The baseline did the same work: equal images always, equal weights in fp32 (what
        # the run measured, not only what it says it checked).
        assert r["images_per_pass"] == {"distnn": r["steps"] * r["batch"],
                                        "bare": r["steps"] * r["batch"]}  # fmt: skip
        if r["precision"] == "fp32":
            assert r["same_work_checked"] == "images and final weights"
            assert 0 <= r["max_abs_weight_diff"] <= 1e-4
        else:
            assert r["same_work_checked"] == "images" and r["max_abs_weight_diff"] is None
    precisions = {r["precision"] for r in doc["compare"]}
    if torch.cuda.is_available() or cpu_has_bf16():
        assert {"fp32", "bf16"} <= precisions and "skipped" not in doc
    else:  # emulated bf16: the run leaves those rows out, and its table says why
        assert precisions == {"fp32"} and "no avx512_bf16 or AMX" in doc["skipped"]
    for r in doc["scaling"]:
        one, two = stats(r["one"]), stats(r["two"])
        assert r["efficiency"] == pytest.approx(two["median"] / (2 * one["median"]))
    assert {r["accum"] for r in doc["scaling"]} == {1, 2}
    # Two ranks need two GPUs: with fewer, the scaling runs on CPU.
    assert doc["scaling_backend"] == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
    # FSDP against DDP on 2 processes: the tutorial CNN at least (resnet18: full runs only).
    assert "tutorial_cnn" in {r["model"] for r in doc["fsdp_vs_ddp"]}
    for r in doc["fsdp_vs_ddp"]:
        assert r["order"] == "ABBA" and r["same_work_checked"] == "images and final weights"
        assert 0 <= r["max_abs_weight_diff"] <= 1e-4
        assert r["strategies"]["fsdp"].startswith("fsdp over")
        assert r["strategies"]["ddp"].startswith("ddp over")
        pairs = zip(stats(r["fsdp"], doc["repeats"])["runs"], stats(r["ddp"])["runs"], strict=True)
        assert stats(r["ratio"])["runs"] == pytest.approx([f / d for f, d in pairs])


def check_memory(doc: dict) -> None:
    cases = [r["case"] for r in doc["rows"]]
    # The quick run covers FSDP with its bf16 and offload options in one case.
    fsdp = ["fsdp_bf16_offload"] if doc["quick"] else [
        "fsdp", "fsdp_offload", "fsdp_bf16", "fsdp_bf16_offload"]  # fmt: skip
    assert cases == ["ddp", "zero1", "zero2", "zero3", "zero2_offload", *fsdp]
    psi, n = doc["rows"][0]["params"], doc["rows"][0]["world_size"]
    assert n == 2
    # The ZeRO paper's bytes per rank (fp32 Adam); an offloaded optimizer stays in the same
    # RAM on a CPU host, so ZeRO-2 + offload is predicted as ZeRO-2.
    zero2 = 4 * psi + 16 * psi / n
    formula = {"ddp": 16 * psi, "zero1": 8 * psi + 12 * psi / n, "zero2": zero2,
               "zero3": 20 * psi / n, "zero2_offload": zero2,
               **{case: 16 * psi / n for case in fsdp}}  # fmt: skip
    ddp, zero3 = doc["rows"][0], doc["rows"][3]
    for r in doc["rows"]:
        assert r["params"] == psi and len(r["runs"]) == doc["repeats"]
        assert stats(r["seconds"], doc["repeats"])["min"] > 0
        for key, per_rank in (("peak", "bytes_per_rank"), ("resident", "resident_bytes_per_rank"),
                              ("setup", "setup_bytes_per_rank")):  # fmt: skip
            assert all(len(run[per_rank]) == n for run in r["runs"])
            assert stats(r[f"{key}_bytes"], doc["repeats"])["runs"] == [
                max(run[per_rank]) for run in r["runs"]
            ]
            assert r[f"{key}_bytes"]["min"] > 0
            median = r[f"{key}_bytes"]["median"]
            assert r[f"{key}_ratio"] == pytest.approx(median / r["predicted_bytes"])
            assert r[f"{key}_vs_ddp"] == pytest.approx(median / ddp[f"{key}_bytes"]["median"])
            zero3_median = zero3[f"{key}_bytes"]["median"]
            assert r[f"{key}_vs_zero3"] == pytest.approx(median / zero3_median)
        assert r["predicted_bytes"] == pytest.approx(formula[r["case"]]), r["case"]
    assert "CPUAdam" in doc["rows"][4]["strategy"]  # the offload row ran DeepSpeed's optimizer
    for r in doc["rows"][5:]:  # each FSDP row ran the options it names, built on meta
        assert r["strategy"].startswith("fsdp over") and "meta device" in r["strategy"]
        assert ("offload cpu" in r["strategy"]) == r["case"].endswith("_offload")
        assert ("precision bf16" in r["strategy"]) == ("bf16" in r["case"])


def check_end_to_end(doc: dict) -> None:
    one, two = doc["rows"]
    assert (one["processes"], two["processes"]) == (1, 2)
    for r in doc["rows"]:
        assert r["reached"] == doc["repeats"]  # the quick target (0.5) is reached every time
        for key in ("seconds_to_target", "wall_s", "final_val_top1"):
            stats(r[key], doc["repeats"])
        assert r["seconds_to_target"]["max"] < r["wall_s"]["min"]
    speedup = one["seconds_to_target"]["median"] / two["seconds_to_target"]["median"]
    assert doc["speedup_to_target"] == pytest.approx(speedup)


def check_recipes(doc: dict) -> None:
    from benchmarks.recipes import PIECES

    assert doc["seeds"] == {"tutorial_cnn": 1} and list(doc["models"]) == ["tutorial_cnn"]
    configs = ["plain", *PIECES, "full", "full (EMA)"]
    assert [(r["model"], r["config"]) for r in doc["rows"]] == [
        (m, c) for m in doc["models"] for c in configs
    ]
    assert 0 < doc["data"]["train_images"] < doc["data"]["train_images_whole"]
    plain = {r["model"]: r["top1"]["runs"] for r in doc["rows"] if r["config"] == "plain"}
    for r in doc["rows"]:
        top1 = r["top1"]
        seeds = doc["seeds"][r["model"]]
        assert len(top1["runs"]) == seeds and r["seeds"] == list(range(seeds))
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in top1["runs"])
        assert top1["min"] <= top1["mean"] <= top1["max"] and top1["std"] >= 0
        pairs = zip(top1["runs"], plain[r["model"]], strict=True)
        assert r["vs_plain"]["runs"] == pytest.approx([v - p for v, p in pairs])
        ema = r["config"] in ("ema", "full (EMA)")
        assert r["metric"] == ("val_top1_ema" if ema else "val_top1")
        assert r["runs_of"] == {"ema": "plain", "full (EMA)": "full"}.get(r["config"], r["config"])
    # The EMA row is read off the plain runs: the EMA must not have changed their training.
    assert doc["ema_check"]["equal"] is True
    assert doc["ema_check"]["plain_val_top1_ema_off"] == plain["tutorial_cnn"][0]
    assert [(c["model"], c["config"]) for c in doc["cost"]] == [
        (m, c) for m in doc["models"] for c in [*PIECES, "full"]
    ]
    for c in doc["cost"]:
        assert c["order"] == "ABBA" and c["same_work_checked"] == "steps and batches per pass"
        assert c["images_per_pass"] == c["steps"] * c["batch"]
        piece = stats(c["piece_s_per_step"], doc["repeats"])["runs"]
        base = stats(c["plain_s_per_step"], doc["repeats"])["runs"]
        assert stats(c["ratio"], doc["repeats"])["min"] > 0
        assert c["ratio"]["runs"] == pytest.approx(
            [p / b for p, b in zip(piece, base, strict=True)]
        )


CHECKS = {"data_throughput": check_data, "train_throughput": check_train,
          "zero_memory": check_memory, "end_to_end": check_end_to_end,
          "recipes": check_recipes}  # fmt: skip


@pytest.fixture(scope="module")
def quick(request, tmp_path_factory) -> tuple[Path, float, str]:
    # Only the benchmarks whose tests were selected (`-k recipes`: that one); all by default.
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}  # fmt: skip
    only = [] if selected >= set(CHECKS) else [f"--only={name}" for name in sorted(selected)]
    out = tmp_path_factory.mktemp("bench")
    start = time.perf_counter()
    r = run_cli("-m", "benchmarks.run", "--quick", f"--out={out}", *only, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, time.perf_counter() - start, r.stdout


@pytest.mark.timeout(660)
@pytest.mark.parametrize("name", CHECKS)
def test_quick_bench_writes_json_table_and_plot(quick, name):
    out, _, stdout = quick
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["quick"] is True
    assert doc["machine"].keys() >= MACHINE and doc["machine"]["git_commit"] != "unknown"
    CHECKS[name](doc)
    table = (out / f"{name}.md").read_text()
    assert table in stdout  # printed as written
    with Image.open(out / f"{name}.png") as png:
        assert png.format == "PNG" and min(png.size) > 200
    report = (out / "README.md").read_text()
    assert f"![{name}]({name}.png)" in report and "#" + table.strip() in report
