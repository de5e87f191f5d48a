"""Per-rank memory of DDP and DeepSpeed ZeRO 1/2/3 (+ optimizer offload), against the formulas.

    python -m benchmarks.zero_memory [--quick] [--repeats 5] [--out benchmarks/results]

A wide MLP (6 × Linear 4096→4096, 101 M parameters; 2 layers at --quick) trains 3 AdamW
steps in fp32 on 2 torchrun processes through distnn's own strategies: --repeats fresh
launches per case, the median with min and max (--quick runs everything in one launch). Each
rank reports the peak memory of those steps above what it held before the model was built: on
CPU the high-water RSS (VmHWM, reset once the strategy is set up) minus the RSS after the
imports and the process group; on CUDA torch.cuda.max_memory_allocated likewise. It reports
too what it still holds after the steps (VmRSS, or memory_allocated): the state the formulas
count, without the transient buffers of communication and gathered parameters. Beside each,
the ZeRO paper's bytes for Ψ parameters on N ranks, fp32 with Adam (4 bytes of parameters,
4 of gradients, 8 of Adam moments; DeepSpeed also keeps a 4-byte fp32 master partition):

    DDP 16Ψ    ZeRO-1 8Ψ + 12Ψ/N    ZeRO-2 4Ψ + 16Ψ/N    ZeRO-3 20Ψ/N

On CPU an offloaded optimizer stays in the same RAM: its row is predicted as ZeRO-2's.
Writes results/zero_memory.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import describe, machine, parser, save, summarize, torchrun_job
from distnn import config, optim, parallel
from distnn import precision as precision_lib
from distnn.parallel import Env, dist

WIDTH = 4096
BUCKET = 20_000_000  # elements: small buckets, or 5e8-element buffers hide the savings

CASES = {  # name: (overrides, predicted bytes per rank as (a, b): a·Ψ + b·Ψ/N)
    "ddp": (["strategy.name=ddp"], (16, 0)),
    "zero1": (["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=1"], (8, 12)),
    "zero2": (["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=2"], (4, 16)),
    # Stage 3 keeps up to stage3_max_live_parameters (default 1e9 elements: this whole model)
    # gathered after use: bound it by a bucket too, as a user short of memory would.
    "zero3": (
        [
            "strategy.name=deepspeed",
            "strategy.deepspeed.zero_stage=3",
            "strategy.deepspeed.ds_config=LIVE",
        ],
        (0, 20),
    ),
    "zero2_offload": (
        [
            "strategy.name=deepspeed",
            "strategy.deepspeed.zero_stage=2",
            "strategy.deepspeed.offload_optimizer=cpu",
        ],
        (4, 16),
    ),
}


LABELS = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
          "zero2_offload": "ZeRO-2 + optimizer offload (DeepSpeedCPUAdam)"}  # fmt: skip


def _status(field: str) -> int:
    """A /proc/self/status memory line, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: each case in turn (built, 3 steps, released); rank 0 reports."""
    env = parallel.detect()
    live = Path(args.worker).with_name("stage3.json")
    bounds = {"stage3_max_live_parameters": BUCKET, "stage3_max_reuse_distance": BUCKET}
    live.write_text(json.dumps({"zero_optimization": bounds}))
    with dist.process_group(env, config.load(None).dist):
        reports = [measure_case(case, args.layers, env, live) for case in args.case.split(",")]
    if env.is_main:
        Path(args.worker).write_text(json.dumps(reports))


def measure_case(case: str, layers: int, env: Env, live: Path) -> dict:
    """Memory the case's 3 training steps add to the rank, all ranks gathered."""
    overrides = [o.replace("LIVE", str(live)) for o in CASES[case][0]]
    cfg = config.load(None, [*overrides, "optim.name=adamw", "optim.lr=1e-4", "train.batch_size=8",
                             f"strategy.deepspeed.reduce_bucket_size={BUCKET}",
                             f"strategy.deepspeed.allgather_bucket_size={BUCKET}",
                             f"strategy.ddp.bucket_cap_mb={BUCKET * 4 / 2**20}"])  # fmt: skip
    device = dist.device_for(env)
    strategy = parallel.build(cfg, env, device, precision_lib.build("fp32", device))
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    gc.collect()
    dist.barrier()
    base = torch.cuda.memory_allocated() if cuda else _status("VmRSS")
    blocks = [m for _ in range(layers) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]
    model = nn.Sequential(*blocks[:-1]).to(device)
    params = sum(p.numel() for p in model.parameters())
    forward = strategy.setup(model, optim.Optimizers(cfg.optim, 8), optim.Schedule(cfg.sched, 3))
    # The peak of the training steps, not of setup (where every rank still builds the
    # whole model before the strategy shards it).
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    x = torch.randn(8, WIDTH, device=device)
    for _ in range(3):
        loss = forward(x).square().mean()
        strategy.backward(loss)
        strategy.step()
    # A skipped (overflowing) step would allocate no optimizer state: measure real steps.
    if not torch.isfinite(loss):
        raise RuntimeError(f"{case}: loss {loss.item()} is not finite")
    dist.barrier()
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    resident = torch.cuda.memory_allocated() if cuda else _status("VmRSS")
    added = torch.tensor([float(peak - base), float(resident - base)], device=device)
    every = [torch.zeros_like(added) for _ in range(env.world_size)]
    torch.distributed.all_gather(every, added)
    report = {"params": params, "world_size": env.world_size, "strategy": strategy.describe(),
              "bytes_per_rank": [int(t[0].item()) for t in every],
              "resident_bytes_per_rank": [int(t[1].item()) for t in every]}  # fmt: skip
    # The engine goes before its process group, as in distnn.train (Strategy.close).
    del forward, model
    strategy.close()
    gc.collect()
    return report


def measure(cases: list[str], layers: int, nproc: int) -> list[dict]:
    """The cases in one launch of `nproc` processes."""
    args = [f"--case={','.join(cases)}", f"--layers={layers}"]
    timeout = 300 + 120 * len(cases)  # a hang's limit: a case takes 3-20 s here
    # A fixed mmap threshold: freed tensors go back to the OS at once, so RSS follows what
    # is alive (glibc's adaptive threshold otherwise keeps freed setup buffers resident).
    return torchrun_job("benchmarks.zero_memory", nproc, args, timeout,
                        MALLOC_MMAP_THRESHOLD_=str(1 << 20))  # fmt: skip


def run(quick: bool, repeats: int, out: Path) -> dict:
    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats, "rows": []}
    layers, nproc = (2 if quick else 6), 2
    # A full run gives every repeat of every case fresh processes, so that none starts from
    # the allocator state another left (no warm-up needed: each measures from after its own
    # imports and process group); a quick run (a check of the pipeline, not of memory)
    # launches once for all of them.
    names = [case for _ in range(repeats) for case in CASES]
    groups = [names] if quick else [[case] for case in names]
    reports: dict[str, list[dict]] = {case: [] for case in CASES}
    for case, report in zip(names, (r for g in groups for r in measure(g, layers, nproc)),
                            strict=True):  # fmt: skip
        reports[case].append(report)
    for case, (_, (a, b)) in CASES.items():
        first = reports[case][0]
        psi, n = first["params"], first["world_size"]
        row = {"case": case, "params": psi, "world_size": n, "strategy": first["strategy"],
               "runs": [{k: r[k] for k in ("bytes_per_rank", "resident_bytes_per_rank")}
                        for r in reports[case]],
               "predicted_bytes": a * psi + b * psi / n}  # fmt: skip
        for key, per_rank in (("peak_bytes", "bytes_per_rank"),
                              ("resident_bytes", "resident_bytes_per_rank")):  # fmt: skip
            row[key] = summarize([max(r[per_rank]) for r in row["runs"]])
        results["rows"].append(row)
        print(f"{case:14} peak {row['peak_bytes']['median'] / 2**30:.2f} GiB, resident "
              f"{row['resident_bytes']['median'] / 2**30:.2f}, formula "
              f"{row['predicted_bytes'] / 2**30:.2f}", flush=True)  # fmt: skip
    ddp = results["rows"][0]
    for row in results["rows"]:
        for key, name in (("peak_bytes", "peak"), ("resident_bytes", "resident")):
            row[f"{name}_ratio"] = row[key]["median"] / row["predicted_bytes"]
            row[f"{name}_vs_ddp"] = row[key]["median"] / ddp[key]["median"]
    return save(out, "zero_memory", results, markdown)


def _gib(stats: dict) -> str:
    return (
        f"{stats['median'] / 2**30:.2f} ({stats['min'] / 2**30:.2f} – {stats['max'] / 2**30:.2f})"
    )


def markdown(results: dict) -> str:
    first = results["rows"][0]
    kind = "CUDA allocated" if results["machine"]["gpu"] else "RSS"
    lines = [
        "# Memory per rank: DDP and ZeRO",
        "",
        f"{describe(results['machine'])}{' (quick run)' if results['quick'] else ''} "
        f"MLP of {first['params'] / 1e6:.0f} M parameters, AdamW, fp32, {first['world_size']} "
        f"processes, buckets of {BUCKET:,} elements; memory added: {kind} (the larger rank), "
        f"median of {results['repeats']} runs (min – max), "
        + ("all in one launch." if results["quick"] else "each in fresh processes."),
        "",
        "| strategy | formula GiB | peak GiB | peak ÷ formula | peak ÷ DDP | resident GiB "
        "| resident ÷ formula | resident ÷ DDP |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {LABELS[r['case']]} | {r['predicted_bytes'] / 2**30:.2f} "
            f"| {_gib(r['peak_bytes'])} | {r['peak_ratio']:.2f} | {r['peak_vs_ddp']:.2f} "
            f"| {_gib(r['resident_bytes'])} | {r['resident_ratio']:.2f} "
            f"| {r['resident_vs_ddp']:.2f} |"
        )
    lines += ["", "Peak: the high-water mark of the 3 steps (gathered parameters, communication "
              "buckets and temporaries included); resident: what the rank holds after them "
              "(parameters, gradients, optimizer state: what the formula counts)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser(
        "benchmarks.zero_memory",
        __doc__,
        "a smaller model, all in one launch",
        "launches per case (>= 5)",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)  # a worker's cases, comma-separated
    p.add_argument("--layers", type=int, default=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    print(markdown(run(args.quick, args.repeats, args.out)))


if __name__ == "__main__":
    main(sys.argv[1:])
