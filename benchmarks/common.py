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


def spread(summary: dict, fmt: str = ",.0f") -> str:
    """A summary as `median (min – max)`."""
    return f"{summary['median']:{fmt}} ({summary['min']:{fmt}} – {summary['max']:{fmt}})"


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


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=RESULTS.parent, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


# The instruction sets that decide the figures: fp32 SIMD width, and whether bf16 is native.
SIMD = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "asimd",
        "sve", "bf16")  # fmt: skip


def _cpu() -> tuple[str, list[str]]:
    """The CPU's model name and its flags (x86 `flags`, Arm `Features`), from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown", []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    flags = next((ln.split(":", 1)[1].split() for ln in lines
                  if ln.startswith(("flags", "Features"))), [])  # fmt: skip
    return (names[0] if names else "unknown"), flags


def machine() -> dict:
    """CPU model and flags, cores, GPU, library versions, git commit (and `git describe
    --dirty`: whether the tree had uncommitted changes), load: beside every figure."""
    cpu, flags = _cpu()
    import PIL
    import torchvision

    try:
        import webdataset
    except ImportError:  # the GPU check also runs on a Python that has torch and little else
        webdataset = None

    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "webdataset": webdataset.__version__ if webdataset else None,
        "pillow": PIL.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_describe": _git("describe", "--always", "--dirty"),
        "load_avg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def describe(m: dict) -> str:
    """The machine line under a results table."""
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores"
    if not m["gpu"] and "cpu_flags" in m:  # results written before flags were recorded lack it
        simd = [f for f in SIMD if f in m["cpu_flags"]]
        if m["cpu_flags"] and not {"avx512_bf16", "amx_bf16", "bf16"} & set(simd):
            simd.append("no avx512_bf16 or AMX: bf16 emulated")
        where += f" ({', '.join(simd)})" if simd else ""
    return (
        f"{where}; torch {m['torch']}; commit {m.get('git_describe', m['git_commit'])}; "
        f"{m['date']}. "
        f"Load average {m['load_avg_start'][0]:.2f} at start, {m['load_avg_end'][0]:.2f} at end."
    )


def save(
    out: Path, name: str, results: dict, markdown: Callable[[dict], str], stamp: str = "machine"
) -> dict:
    """Stamp the load at the end (on results[stamp], the machine line of what just ran) and
    write results/<name>.json and its table <name>.md."""
    results[stamp]["load_avg_end"] = os.getloadavg()
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


def main_with_plan(
    module: str, doc: str | None, quick: str, worker: Callable[[str, Any, int], None],
    run: Callable[[bool, int, Path], object], argv: list[str] | None,
) -> None:  # fmt: skip
    """main() of a benchmark whose rows run in torchrun workers: `run` plans them and starts the
    workers (`torchrun_job`, passing --plan as JSON), `worker(file, plan, repeats)` measures."""
    p = parser(module, doc, quick)
    p.add_argument("--plan", help="what the workers measure (internal, JSON)")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.plan), args.repeats)
    else:
        run(args.quick, args.repeats, args.out)


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
