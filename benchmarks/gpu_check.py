"""`make gpu-check`: every CUDA test and the GPU benchmark rows, in one command (under 8 minutes
on one H200).

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu] [--budget 450] [--repeats 3]

Without a CUDA GPU it says so in one line and exits 0. With one:
1. tests/test_cuda.py under pytest: NCCL, pinned memory and the side-stream prefetcher, fp16
   with a GradScaler, channels_last + bf16, exact resume with the CUDA RNG, DeepSpeed ZeRO-2
   with FusedAdam; each test's outcome and seconds.
2. ResNet-50 at 224 px, bf16, channels_last: distnn's loop against a bare loop on in-memory
   batches (train_throughput's Case), img/s, and TFLOP/s and MFU from distnn's FLOP count and
   the device's peak (monitor/throughput.py).
3. The shard loader into one GPU: ImageNet-like JPEG shards (350-500 px, cropped to 224)
   decoded and augmented in cores - 2 worker processes, pinned, copied on the side stream and
   normalised on the GPU; steady-state img/s, each worker's first batch left out.
4. `python -m distnn.train` as users run it, ResNet-50 at 224 px on synthetic data: one process
   in bf16; DDP over NCCL on one GPU (torchrun --nproc_per_node=1); fp16 with a GradScaler;
   DeepSpeed ZeRO-2 with FusedAdam (where deepspeed imports). img/s per GPU, TFLOP/s and MFU
   as distnn logs them, the first log interval (cuDNN autotuning, worker start) left out.
Writes <out>/gpu_check.json and the table gpu_check.md. A row whose package is missing is in
the table as skipped, naming it; a part the time budget cannot fit is skipped, saying so. Exit
status 1 when a test or a row failed.

Packages the GPU machine's Python lacks travel as wheels in .whl/ (scripts/gpu_wheels.sh): they
are installed into a folder of their own and put on PYTHONPATH, for this process and every
process it starts. No venv is made: torch comes from the Python that runs this.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Only the standard library up here: a Python without torch must still get its one line.
ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "distnn-gpu-site"

# ResNet-50 against the bare loop: images per pass = batch × steps.
COMPARE_BATCH, COMPARE_STEPS = 256, 20
# distnn.train rows: one epoch of synthetic data, a record every LOG_EVERY steps.
TRAIN_BATCH, TRAIN_STEPS, LOG_EVERY = 128, 40, 10
# Shard loader: UNIQUE generated JPEGs, each linked COPIES times (decoding costs the same, and
# generating them is the slow part); batches of SHARD_BATCH so every worker serves several.
UNIQUE, COPIES, SHARD_BATCH = 1024, 6, 64
# Seconds each part needs on an H200, roughly; the tests get what the rows leave.
NEEDS = {"resnet50": 40, "shards": 50, "train": 35, "zero2": 60}
# What the tests leave for the rows: every row's share (three distnn.train rows, one ZeRO-2).
ROWS_RESERVE = NEEDS["resnet50"] + NEEDS["shards"] + 3 * NEEDS["train"] + NEEDS["zero2"]


class Skip(Exception):
    """A row that cannot run here (a missing package, no time left): skipped, with why."""


class Budget:
    """The seconds left of the whole check: each part gets what remains."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_group(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    """Run `cmd` in a session of its own; past `timeout` stop the whole session (torchrun's
    workers, pytest's xdist workers), not only the process started: SIGINT first, so pytest
    still writes its report of the tests that ran, then SIGKILL. (exit code, out, err)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        tail = (out + err).strip()[-1500:]
        raise TimeoutError(f"stopped after {timeout:.0f} s: {tail}") from None
    return proc.returncode, out, err


def carry_wheels() -> dict[str, list[str]]:
    """Install the wheels in .whl/ into SITE and put it first on the import path, here and (via
    PYTHONPATH, with the checkout) in every child. A wheel this Python cannot take (made for
    another Python version) is left out, named; the rows that need it are then skipped."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return {"installed": [], "refused": []}

    def install(*paths: Path) -> bool:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--upgrade",
               "--target", str(SITE), *map(str, paths)]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True).returncode == 0

    # pip installs all or none: one wheel it refuses would cost every other one.
    refused = [] if install(*wheels) else [w.name for w in wheels if not install(w)]
    if refused:
        print(f"gpu-check: {sys.executable} cannot install {', '.join(refused)}", flush=True)
    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), *([old] if old else [])])
    return {"installed": [w.name for w in wheels if w.name not in refused], "refused": refused}


def why(stderr: str) -> str:
    """The line that says why a run failed: distnn's `error: ...` or the last exception raised,
    not the traceback torchrun's agent adds after its worker's."""
    said = [ln.strip() for ln in stderr.splitlines()
            if re.match(r"\s*(\[rank\d+\]:\s*)?(error: |[\w.]*(Error|Exception)(:|$))", ln)
            and "ChildFailedError" not in ln]  # fmt: skip
    return said[-1] if said else stderr.strip()[-800:]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- 1. the CUDA tests ------------------------------------------------------------------------


def run_tests(budget: Budget) -> dict:
    timeout = budget.left() - ROWS_RESERVE
    if timeout < 60:
        return {"status": "skipped", "why": f"time budget: {budget.left():.0f} s left"}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs",
               f"--junitxml={xml}"]  # fmt: skip
        if installed("xdist"):  # the DeepSpeed test spends a minute compiling FusedAdam
            cmd += ["-n", "4"]
        print(f"== tests: {' '.join(cmd[2:])} (at most {timeout:.0f} s)", flush=True)
        start = time.perf_counter()
        try:
            code, out, err = run_group(cmd, timeout)
            print(out[-6000:] + err[-2000:], flush=True)
            lines = out.strip().splitlines()
            summary = lines[-1] if lines else err.strip()[-500:]
        except TimeoutError as e:  # the tests that finished are in the report all the same
            code, summary = None, str(e)
            print(summary, flush=True)
        cases = junit_cases(xml) if xml.is_file() else []
    return {
        "status": "ok" if code == 0 else "failed",
        "exit_code": code,
        "summary": summary,
        "seconds": time.perf_counter() - start,
        "cases": cases,
    }


def junit_cases(xml: Path) -> list[dict]:
    """Each test's outcome, seconds and message, from pytest's JUnit XML (after an interrupt:
    the tests that had finished)."""
    cases = []
    for case in ET.parse(xml).iter("testcase"):
        if not case.get("name"):  # an interrupted session's placeholder
            continue
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome, message = name, (found.get("message") or "").strip()[:400]
                break
        cases.append({"test": case.get("name"), "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": message})  # fmt: skip
    return cases


# --- 2. ResNet-50: distnn against a bare loop -------------------------------------------------


def resnet50_row(repeats: int) -> dict:
    import torch

    from benchmarks.train_throughput import Case, compare
    from distnn.monitor.throughput import peak_flops, train_flops_per_image

    with tempfile.TemporaryDirectory() as tmp:
        case = Case("resnet50", 224, COMPARE_BATCH, "bf16", COMPARE_STEPS, run_dir=Path(tmp))
        row = compare(case, repeats)
    flops = train_flops_per_image(case.init, case.size, case.device)
    peak = peak_flops(torch.cuda.get_device_name(case.device))
    rate = row["distnn"]["median"]
    del case
    torch.cuda.empty_cache()  # the next rows run in processes of their own
    return {
        "images_per_sec_per_gpu": rate,
        "tflops": rate * flops / 1e12,
        "mfu": rate * flops / peak if peak else None,
        "bare_images_per_sec": row["bare"]["median"],
        "distnn_over_bare": row["ratio"]["median"],
        "train_gflops_per_image": flops / 1e9,
        "notes": f"batch {COMPARE_BATCH}, {COMPARE_STEPS} steps per pass, median of {repeats}; "
        f"bare loop {row['bare']['median']:,.0f} img/s, distnn ÷ bare "
        f"{row['ratio']['median']:.3f}",
        "compare": row,
    }


# --- 3. the shard loader into one GPU ---------------------------------------------------------


def _jpeg_part(job: tuple[str, int, int]) -> None:
    from benchmarks.data_throughput import make_images

    root, n, seed = job
    make_images(Path(root), "jpg", n, seed)


def jpeg_folder(root: Path, processes: int) -> Path:
    """An ImageFolder of UNIQUE × COPIES ImageNet-like JPEGs (train; val once), made in
    parallel: each process its own part and seed, then hard links under unique names."""
    jobs = [(str(root / f"part{k}"), UNIQUE // processes, k) for k in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_jpeg_part, jobs)
    src = root / "images"
    for k in range(processes):
        part = root / f"part{k}"
        for f in part.rglob("*.jpg"):
            rel = f.relative_to(part)  # split/class/name
            (src / rel.parent).mkdir(parents=True, exist_ok=True)
            for c in range(COPIES if rel.parts[0] == "train" else 1):
                os.link(f, src / rel.parent / f"{k}_{c}_{f.name}")
    return src


def shard_row(repeats: int) -> dict:
    if not installed("webdataset"):
        raise Skip("webdataset not installed (writing shards needs it; carry it: "
                   "scripts/gpu_wheels.sh)")  # fmt: skip
    import torch

    from distnn import config, data
    from distnn.data import shard
    from distnn.data.prefetch import DevicePrefetcher
    from distnn.parallel.env import Env

    cores = os.cpu_count() or 2
    workers = max(1, cores - 2)  # the main process and the pin-memory thread need a core
    device = torch.device("cuda", torch.cuda.current_device())
    with tempfile.TemporaryDirectory() as tmp:
        src = jpeg_folder(Path(tmp), cores)
        out = Path(tmp) / "shards"
        shard.shard("imagefolder", src, out, max_count=256, workers=cores)
        cfg = config.load(None, ["data.source=shards", f"data.root={out}",
                                 "data.image_size=224", f"data.workers={workers}",
                                 f"train.batch_size={SHARD_BATCH}"])  # fmt: skip
        loaders = data.build(cfg, Env(), pin_memory=True)

        def epoch_rate(epoch: int) -> float:
            """img/s from the moment every worker has delivered its first batch to the last."""
            loaders.train_order.set_epoch(epoch)
            batches = DevicePrefetcher(loaders.train, device, loaders.mean, loaders.std, True)
            arrivals = [(time.perf_counter(), len(x)) for x, _ in batches]
            torch.cuda.synchronize(device)
            end = time.perf_counter()
            first = min(workers, len(arrivals) // 4)
            return sum(n for _, n in arrivals[first + 1 :]) / (end - arrivals[first][0])

        rates = [epoch_rate(epoch) for epoch in range(repeats + 1)][1:]  # first: warm-up
        images = len(loaders.train) * SHARD_BATCH
    rate = statistics.median(rates)
    return {
        "images_per_sec_per_gpu": rate,
        "runs": rates,
        "workers": workers,
        "images_per_epoch": images,
        "notes": f"{workers} workers, batch {SHARD_BATCH}, {images} JPEGs per epoch "
        f"(350-500 px → 224, random-resized crop + flip), median of {repeats} epochs",
    }


# --- 4. distnn.train as users run it ----------------------------------------------------------

TRAIN = [
    "model.name=resnet50", "data.source=synthetic", "data.image_size=224",
    f"data.synthetic_train={TRAIN_BATCH * TRAIN_STEPS}", f"data.synthetic_val={TRAIN_BATCH}",
    f"train.batch_size={TRAIN_BATCH}", f"train.max_steps={TRAIN_STEPS}",
    f"train.log_every={LOG_EVERY}", "sched.warmup_steps=0", "ckpt.epoch_end=false",
    "log.progress=off", "log.wandb.mode=disabled", "log.tensorboard=false", "dist.timeout_s=300",
]  # fmt: skip
BF16 = ["precision=bf16", "model.channels_last=true"]
# (row, overrides, torchrun processes (0: plain python), module it needs, what the log must say)
TRAIN_ROWS = [
    ("train: 1 process, bf16", BF16, 0, None, "single process"),
    ("train: DDP over NCCL, 1 GPU", [*BF16, "strategy.name=ddp"], 1, None, "over nccl"),
    ("train: fp16 + GradScaler", ["precision=fp16", "model.channels_last=true"], 0, None, ""),
    # NCHW: DeepSpeed broadcasts each weight as p.data.view(torch.uint8), which a channels_last
    # weight (last stride not 1) refuses.
    ("train: DeepSpeed ZeRO-2 + FusedAdam (NCHW)",
     ["precision=bf16", "model.channels_last=false", "strategy.name=deepspeed",
      "strategy.deepspeed.zero_stage=2", "optim.name=adamw", "optim.lr=0.001"], 1, "deepspeed",
     "FusedAdam"),
]  # fmt: skip


def train_row(overrides: list[str], nproc: int, expect: str, timeout: float) -> dict:
    from distnn.monitor import read_metrics

    workers = max(1, (os.cpu_count() or 2) - 2)
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, *(torchrun if nproc else []), "-m", "distnn.train",
               f"run.dir={tmp}", "run.name=row", *TRAIN, f"data.workers={workers}",
               *overrides]  # fmt: skip
        code, out, err = run_group(cmd, timeout)
        if code != 0:
            raise RuntimeError(f"exit {code}: {why(err)}")
        records = [r for r in read_metrics(Path(tmp) / "row") if "loss" in r]
    said = [ln.split("strategy:", 1)[1].strip() for ln in out.splitlines() if "strategy:" in ln]
    strategy = said[0] if said else "?"
    if expect not in strategy:
        raise RuntimeError(f"the run log says 'strategy: {strategy}', expected {expect!r}")
    timed = records[1:]  # the first interval holds cuDNN's autotuning and the workers' start

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    notes = [strategy, f"data_wait {_cell(median('data_wait'), '.2f')}",
             f"{max(r['memory_gib'] for r in records):.1f} GiB peak"]  # fmt: skip
    if records[-1]["skipped_steps"]:
        notes.append(f"{records[-1]['skipped_steps']} steps skipped by the loss scaler")
    return {
        "images_per_sec_per_gpu": median("images_per_sec_per_device"),
        "tflops": median("tflops_per_device"),
        "mfu": median("mfu"),
        "data_wait": median("data_wait"),
        "skipped_steps": records[-1]["skipped_steps"],
        "losses": [r["loss"] for r in records],
        "strategy": strategy,
        "notes": ", ".join(notes),
        "records": timed,
    }


# --- the check --------------------------------------------------------------------------------


def attempt(name: str, need: float, budget: Budget, fn: Callable[[float], dict]) -> dict:
    """One row: run `fn(seconds it may take)`; a row that fails or is skipped is recorded as
    such, and the check goes on to the next (one broken path must not hide the others)."""
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        if budget.left() < need:
            raise Skip(f"time budget: {budget.left():.0f} s left, the row needs ~{need:.0f} s")
        row = {"row": name, "status": "ok", **fn(budget.left())}
    except Skip as e:
        row = {"row": name, "status": "skipped", "why": str(e)}
    except Exception as e:  # recorded in the table; the exit status says a row failed
        row = {"row": name, "status": "failed", "why": f"{type(e).__name__}: {e}"}
    row["seconds"] = time.perf_counter() - start
    rate = _cell(row.get("images_per_sec_per_gpu"), ",.0f")
    print(f"   {row['status']} in {row['seconds']:.0f} s, {rate} img/s per GPU: "
          f"{row.get('notes') or row.get('why')}", flush=True)  # fmt: skip
    return row


def check(out: Path, budget_s: float, repeats: int) -> int:
    import torch

    from benchmarks.common import machine, save

    budget = Budget(budget_s)
    wall = time.perf_counter()
    carried = carry_wheels()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    results: dict[str, Any] = {
        "machine": machine(),
        "gpu": {"name": props.name, "count": torch.cuda.device_count(),
                "memory_gib": props.total_memory / 2**30,
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda},
        "carried_wheels": carried,
        "budget_s": budget_s,
        "repeats": repeats,
    }  # fmt: skip
    results["tests"] = run_tests(budget)
    rows = [
        attempt("ResNet-50 224 px bf16 channels_last (distnn vs bare loop)",
                NEEDS["resnet50"], budget, lambda _: resnet50_row(repeats)),
        attempt("shard loader → 1 GPU", NEEDS["shards"], budget, lambda _: shard_row(repeats)),
    ]  # fmt: skip
    for name, overrides, nproc, module, expect in TRAIN_ROWS:

        def row(left: float, module=module, overrides=overrides, nproc=nproc, expect=expect):
            if module and not installed(module):
                raise Skip(f"{module} not installed (carry it: scripts/gpu_wheels.sh)")
            return train_row(overrides, nproc, expect, left)

        rows.append(attempt(name, NEEDS["zero2" if module else "train"], budget, row))
    loader, resnet = rows[1], rows[0]
    if loader["status"] == resnet["status"] == "ok":
        loader["vs_resnet50_training"] = (
            loader["images_per_sec_per_gpu"] / resnet["images_per_sec_per_gpu"]
        )
        loader["notes"] += f"; {loader['vs_resnet50_training']:.2f}× ResNet-50 bf16 training"
    results["rows"] = rows
    results["wall_s"] = time.perf_counter() - wall
    save(out, "gpu_check", results, markdown)
    print(markdown(results), flush=True)
    print(f"gpu-check: {out / 'gpu_check.json'}, {out / 'gpu_check.md'} "
          f"({results['wall_s']:.0f} s)", flush=True)  # fmt: skip
    failed = results["tests"]["status"] == "failed" or any(r["status"] == "failed" for r in rows)
    return 1 if failed else 0


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(results: dict) -> str:
    from benchmarks.common import describe

    g, t = results["gpu"], results["tests"]
    lines = [
        "# GPU check (`make gpu-check`)",
        "",
        f"{describe(results['machine'])} {g['count']} × {g['name']} ({g['memory_gib']:.0f} GiB, "
        f"compute capability {g['capability']}, CUDA {g['cuda']}). Whole check "
        f"{results['wall_s']:.0f} s of a {results['budget_s']:.0f} s budget.",
        "",
        f"## Tests (tests/test_cuda.py): {t.get('summary') or t.get('why')}",
        "",
        "| test | outcome | s | message |",
        "| --- | --- | ---: | --- |",
    ]
    for c in t.get("cases", []):
        message = (c["message"] or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} | {message} |")
    lines += [
        "",
        "## Benchmark rows",
        "",
        "MFU: achieved model FLOP/s (matmuls and convolutions, forward × 3) over the device's "
        "dense bf16 peak, whatever the precision.",
        "",
        "| row | status | img/s per GPU | TFLOP/s | MFU | notes |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results["rows"]:
        notes = r.get("notes") if r["status"] == "ok" else f"{r['status']}: {r.get('why')}"
        notes = str(notes).replace("|", "\\|").replace("\n", " ")[:600]
        lines.append(
            f"| {r['row']} | {r['status']} | {_cell(r.get('images_per_sec_per_gpu'), ',.0f')} "
            f"| {_cell(r.get('tflops'), '.1f')} | {_cell(r.get('mfu'), '.1%')} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per figure")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(f"gpu-check: {sys.executable} cannot import torch ({e}), so no GPU to check here; "
              "`make setup` first, or GPU_PY=<a python with torch>")  # fmt: skip
        return 0
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__}: "
              "torch.cuda.is_available() is False); nothing to check")  # fmt: skip
        return 0
    return check(args.out, args.budget, args.repeats)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
