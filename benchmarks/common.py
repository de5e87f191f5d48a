"""What every benchmark shares: repeated timing with warm-up, and the machine it ran on."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def timed(run: Callable[[], int], repeats: int) -> dict:
    """Items/s of `run` (which returns how many items it processed): one warm-up pass, then
    `repeats` timed ones; median, min, max."""
    run()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t))
    return summarize(rates)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=RESULTS.parent,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> dict:
    """CPU model, cores, GPU, library versions, git commit, load: beside every figure."""
    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    import PIL
    import torchvision

    try:
        import webdataset
    except ImportError:  # the GPU check also runs on a Python that has torch and little else
        webdataset = None

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "webdataset": webdataset.__version__ if webdataset else None,
        "pillow": PIL.__version__,
        "git_commit": _git_commit(),
        "load_avg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def describe(m: dict) -> str:
    """The machine line under a results table."""
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores"
    return (
        f"{where}; torch {m['torch']}; commit {m['git_commit']}; {m['date']}. "
        f"Load average {m['load_avg_start'][0]:.2f} at start, {m['load_avg_end'][0]:.2f} at end."
    )


def save(out: Path, name: str, results: dict, markdown: Callable[[dict], str]) -> dict:
    """Stamp the load at the end and write results/<name>.json and its table <name>.md."""
    results["machine"]["load_avg_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(results))
    return results


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a median needs at least one run)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def torchrun_job(module: str, nproc: int, args: list[str], timeout: float, **env: str) -> Any:
    """Run `python -m module --worker=FILE ARGS` as `nproc` torchrun processes (with `env`
    added to the environment); the JSON its rank 0 wrote to FILE. On a host with GPUs but
    fewer than `nproc`, the processes run on CPU (gloo): NCCL refuses two ranks on one GPU."""
    environ = {**os.environ, **env}
    if 0 < torch.cuda.device_count() < nproc:
        environ["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", module, f"--worker={out}", *args]  # fmt: skip
        subprocess.run(cmd, check=True, timeout=timeout, cwd=RESULTS.parents[1], env=environ)
        return json.loads(out.read_text())


def parser(
    module: str, doc: str | None, quick: str, repeats: str = "timed passes per figure (>= 5)"
) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --repeats, --out, and --worker for its
    child processes."""
    p = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--repeats", type=positive_int, default=5, help=repeats)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a child process: its result file
    return p
