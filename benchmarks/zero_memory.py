"""Per-rank memory of DDP, DeepSpeed ZeRO 1/2/3 (+ optimizer offload) and FSDP2 (fp32, bf16
mixed precision, each with and without CPU offload), against the formulas.

    python -m benchmarks.zero_memory [--quick] [--repeats 5] [--out benchmarks/results]

A wide MLP (6 × Linear 4096→4096, 101 M parameters; 2 × 1024→1024 at --quick) trains 3 AdamW
steps on 2 torchrun processes through distnn's own strategies: --repeats fresh launches per
case, the median with min and max (--quick runs everything in one launch, FSDP only in bf16
with offload). Each rank reports three figures, each above what it held before the model was
built (RSS after the imports, torch._dynamo's included, and the process group; on CUDA
memory_allocated):
- build + setup: the high-water RSS (VmHWM) while the model is built and the strategy sets
  up. As in distnn.train, DDP and DeepSpeed (ZeRO-3 included: distnn does not use
  deepspeed.zero.Init) get the whole model built on every rank; FSDP (strategy.fsdp.meta_init,
  the default) gets it built on the meta device and filled shard by shard after sharding
  (models/deferred.py), so no rank holds the whole model at any time.
- peak: the high-water RSS of the 3 steps (VmHWM reset once the strategy is set up):
  gathered parameters, communication buckets, temporaries included.
- resident: what the rank still holds after the steps (VmRSS): the state the formulas count.
On CUDA torch.cuda.max_memory_allocated and memory_allocated stand for VmHWM and VmRSS.
Beside them, the ZeRO paper's bytes for Ψ parameters on N ranks with Adam (fp32: 4 bytes of
parameters, 4 of gradients, 8 of Adam moments; DeepSpeed also keeps a 4-byte fp32 master
partition), and FSDP's, where everything is sharded and the fp32 parameters are the master:

    DDP 16Ψ    ZeRO-1 8Ψ + 12Ψ/N    ZeRO-2 4Ψ + 16Ψ/N    ZeRO-3 20Ψ/N    FSDP 16Ψ/N

FSDP's steps add, transiently, one block's gathered parameters at a time (the blocks here:
each Linear, resharded after forward) and its unsharded gradients before the reduce-scatter;
in bf16 (MixedPrecisionPolicy: bf16 parameters for compute, fp32 sharded parameters,
gradients and Adam state, fp32 reduction) the gathered copies are bf16 and the formula is
still 16Ψ/N. On CPU an offloaded optimizer or offloaded FSDP shards stay in the same RAM:
those rows are predicted as their non-offloaded ones. After a step distnn sets the gradients
to None: FSDP's sharded ones are freed (12Ψ/N resident), where DDP's gradient buckets stay.
Writes results/zero_memory.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo  # see below
from torch import nn

from benchmarks.common import describe, machine, parser, save, summarize, torchrun_job
from distnn import config, optim, parallel
from distnn import precision as precision_lib
from distnn.models import deferred
from distnn.parallel import Env, dist

# torch._dynamo (~155 MB of RSS) is imported by the first optimizer step: imported here, it is
# part of every rank's baseline, not of the memory a strategy adds. (Figures recorded before
# 2026-12-01 counted it: 0.14-0.15 GiB more in every row.)
WIDTH, QUICK_WIDTH = 4096, 1024
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
    # FSDP2: every block (each Linear) sharded, then the root; meta-device build by default.
    "fsdp": (["strategy.name=fsdp"], (0, 16)),
    "fsdp_offload": (["strategy.name=fsdp", "strategy.fsdp.offload=cpu"], (0, 16)),
    "fsdp_bf16": (["strategy.name=fsdp", "precision=bf16"], (0, 16)),
    "fsdp_bf16_offload": (
        ["strategy.name=fsdp", "precision=bf16", "strategy.fsdp.offload=cpu"],
        (0, 16),
    ),
}


LABELS = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
          "zero2_offload": "ZeRO-2 + optimizer offload (DeepSpeedCPUAdam)", "fsdp": "FSDP",
          "fsdp_offload": "FSDP + CPU offload", "fsdp_bf16": "FSDP bf16 mixed",
          "fsdp_bf16_offload": "FSDP bf16 mixed + CPU offload"}  # fmt: skip


# A row's figures (the larger rank's, per run) and the per-rank lists they come from.
PER_RANK = {"peak_bytes": "bytes_per_rank", "resident_bytes": "resident_bytes_per_rank",
            "setup_bytes": "setup_bytes_per_rank"}  # fmt: skip


def _status(field: str) -> int:
    """A /proc/self/status memory line, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: each case in turn (built, 3 steps, released); rank 0 reports."""
    env = parallel.detect()
    live = Path(args.worker).with_name("stage3.json")
    bounds = {"stage3_max_live_parameters": BUCKET, "stage3_max_reuse_distance": BUCKET}
    live.write_text(json.dumps({"zero_optimization": bounds}))
    with dist.process_group(env, config.load(None).dist):
        reports = [measure_case(case, args.layers, args.width, env, live)
                   for case in args.case.split(",")]  # fmt: skip
    if env.is_main:
        Path(args.worker).write_text(json.dumps(reports))


def measure_case(case: str, layers: int, width: int, env: Env, live: Path) -> dict:
    """Memory the case's build, setup and 3 training steps add to the rank, all ranks gathered."""
    start = time.perf_counter()
    overrides = [o.replace("LIVE", str(live)) for o in CASES[case][0]]
    cfg = config.load(None, [*overrides, "optim.name=adamw", "optim.lr=1e-4", "train.batch_size=8",
                             f"strategy.deepspeed.reduce_bucket_size={BUCKET}",
                             f"strategy.deepspeed.allgather_bucket_size={BUCKET}",
                             f"strategy.ddp.bucket_cap_mb={BUCKET * 4 / 2**20}"])  # fmt: skip
    device = dist.device_for(env)
    precision = precision_lib.build(cfg.precision, device)
    strategy = parallel.build(cfg, env, device, precision)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    gc.collect()
    dist.barrier()
    base = torch.cuda.memory_allocated() if cuda else _status("VmRSS")
    _reset_peak(cuda)

    def build() -> nn.Sequential:
        blocks = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())]
        return nn.Sequential(*blocks[:-1])

    # As distnn.train builds it: on the meta device where the strategy fills its own shards
    # (FSDP), else whole on every rank.
    model = deferred.record(build) if strategy.meta_init else build().to(device)
    params = sum(p.numel() for p in model.parameters())
    forward = strategy.setup(model, optim.Optimizers(cfg.optim, 8), optim.Schedule(cfg.sched, 3))
    dist.barrier()
    setup = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    # The peak of the training steps, apart from that of the build and setup.
    _reset_peak(cuda)
    x = torch.randn(8, width, device=device)
    for _ in range(3):
        with precision.autocast():
            loss = forward(x).float().square().mean()
        strategy.backward(loss)
        strategy.step()
    # A skipped (overflowing) step would allocate no optimizer state: measure real steps.
    if not torch.isfinite(loss):
        raise RuntimeError(f"{case}: loss {loss.item()} is not finite")
    dist.barrier()
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    resident = torch.cuda.memory_allocated() if cuda else _status("VmRSS")
    added = torch.tensor([float(peak - base), float(resident - base), float(setup - base)],
                         device=device)  # fmt: skip
    every = [torch.zeros_like(added) for _ in range(env.world_size)]
    torch.distributed.all_gather(every, added)
    report = {"params": params, "world_size": env.world_size, "strategy": strategy.describe(),
              "bytes_per_rank": [int(t[0].item()) for t in every],
              "resident_bytes_per_rank": [int(t[1].item()) for t in every],
              "setup_bytes_per_rank": [int(t[2].item()) for t in every]}  # fmt: skip
    # The engine goes before its process group, as in distnn.train (Strategy.close).
    del forward, model
    strategy.close()
    gc.collect()
    report["seconds"] = time.perf_counter() - start  # build, setup, steps: for the time budget
    return report


def measure(cases: list[str], layers: int, width: int, nproc: int) -> list[dict]:
    """The cases in one launch of `nproc` processes."""
    args = [f"--case={','.join(cases)}", f"--layers={layers}", f"--width={width}"]
    timeout = 300 + 120 * len(cases)  # a hang's limit: a case takes 3-20 s here
    # A fixed mmap threshold: freed tensors go back to the OS at once, so RSS follows what
    # is alive (glibc's adaptive threshold otherwise keeps freed setup buffers resident).
    return torchrun_job("benchmarks.zero_memory", nproc, args, timeout,
                        MALLOC_MMAP_THRESHOLD_=str(1 << 20))  # fmt: skip


def run(quick: bool, repeats: int, out: Path) -> dict:
    layers, width = (2, QUICK_WIDTH) if quick else (6, WIDTH)
    nproc = 2
    results: dict = {"machine": machine(), "quick": quick, "repeats": repeats, "rows": [],
                     "block_params": width * width + width}  # fmt: skip
    # A full run gives every repeat of every case fresh processes, so that none starts from
    # the allocator state another left (no warm-up needed: each measures from after its own
    # imports and process group); a quick run (a check of the pipeline, not of memory)
    # launches once for all of them, and runs FSDP once, with bf16 and offload (its paths).
    cases = [c for c in CASES if not (quick and c in ("fsdp", "fsdp_offload", "fsdp_bf16"))]
    names = [case for _ in range(repeats) for case in cases]
    groups = [names] if quick else [[case] for case in names]
    reports: dict[str, list[dict]] = {case: [] for case in cases}
    for case, report in zip(names, (r for g in groups for r in measure(g, layers, width, nproc)),
                            strict=True):  # fmt: skip
        reports[case].append(report)
    for case in cases:
        a, b = CASES[case][1]
        first = reports[case][0]
        psi, n = first["params"], first["world_size"]
        row = {"case": case, "params": psi, "world_size": n, "strategy": first["strategy"],
               "runs": [{k: r[k] for k in PER_RANK.values()} for r in reports[case]],
               "predicted_bytes": a * psi + b * psi / n}  # fmt: skip
        for key, per_rank in PER_RANK.items():
            row[key] = summarize([max(r[per_rank]) for r in row["runs"]])
        row["seconds"] = summarize([r["seconds"] for r in reports[case]])
        results["rows"].append(row)
        print(f"{case:17} setup {row['setup_bytes']['median'] / 2**30:.2f} GiB, peak "
              f"{row['peak_bytes']['median'] / 2**30:.2f}, resident "
              f"{row['resident_bytes']['median'] / 2**30:.2f}, formula "
              f"{row['predicted_bytes'] / 2**30:.2f}; {row['seconds']['median']:.1f} s",
              flush=True)  # fmt: skip
    by = {row["case"]: row for row in results["rows"]}
    for row in results["rows"]:
        for key, name in (("peak_bytes", "peak"), ("resident_bytes", "resident"),
                          ("setup_bytes", "setup")):  # fmt: skip
            row[f"{name}_ratio"] = row[key]["median"] / row["predicted_bytes"]
            row[f"{name}_vs_ddp"] = row[key]["median"] / by["ddp"][key]["median"]
            row[f"{name}_vs_zero3"] = row[key]["median"] / by["zero3"][key]["median"]
    return save(out, "zero_memory", results, markdown)


def _gib(stats: dict) -> str:
    return (
        f"{stats['median'] / 2**30:.2f} ({stats['min'] / 2**30:.2f} – {stats['max'] / 2**30:.2f})"
    )


def markdown(results: dict) -> str:
    first = results["rows"][0]
    kind = "CUDA allocated" if results["machine"]["gpu"] else "RSS"
    block = results["block_params"]
    lines = [
        "# Memory per rank: DDP, ZeRO and FSDP",
        "",
        f"{describe(results['machine'])}{' (quick run)' if results['quick'] else ''} "
        f"MLP of {first['params'] / 1e6:.0f} M parameters, AdamW, fp32 unless marked, "
        f"{first['world_size']} processes, buckets of {BUCKET:,} elements; memory added: "
        f"{kind} (the larger rank), median of {results['repeats']} runs (min – max), "
        + ("all in one launch." if results["quick"] else "each in fresh processes."),
        "",
        "| strategy | formula GiB | build + setup GiB | peak GiB | peak ÷ formula | peak ÷ DDP "
        "| resident GiB | resident ÷ formula | resident ÷ DDP |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {LABELS[r['case']]} | {r['predicted_bytes'] / 2**30:.2f} "
            f"| {_gib(r['setup_bytes'])} | {_gib(r['peak_bytes'])} | {r['peak_ratio']:.2f} "
            f"| {r['peak_vs_ddp']:.2f} | {_gib(r['resident_bytes'])} "
            f"| {r['resident_ratio']:.2f} | {r['resident_vs_ddp']:.2f} |"
        )
    lines += ["", "Build + setup: the high-water mark while the model is built and the strategy "
              "set up (FSDP builds on the meta device and fills its shards; the others build the "
              "whole model on every rank); peak: that of the 3 steps (gathered parameters, "
              "communication buckets and temporaries included); resident: what the rank holds "
              "after them (parameters, gradients, optimizer state: what the formula counts). "
              "Offloaded rows stay in the same RAM on a CPU host: predicted as without offload. "
              "The baseline includes torch._dynamo, which the first optimizer step imports "
              "(about 0.15 GiB, counted in every row of the figures recorded before "
              "2026-12-01).",
              "", "FSDP against ZeRO-3 (each ÷ ZeRO-3's fp32 median):", "",
              "| strategy | formula | build + setup | peak | resident |",
              "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    zero3 = next(r for r in results["rows"] if r["case"] == "zero3")
    for r in results["rows"]:
        if r["case"].startswith("fsdp"):
            lines.append(
                f"| {LABELS[r['case']]} | {r['predicted_bytes'] / zero3['predicted_bytes']:.2f} "
                f"| {r['setup_vs_zero3']:.2f} | {r['peak_vs_zero3']:.2f} "
                f"| {r['resident_vs_zero3']:.2f} |"
            )
    lines += ["", "FSDP's formula 16Ψ/N counts its sharded state during a step; its steps add "
              f"one gathered block at a time ({block / 1e6:.1f} M parameters: "
              f"{4 * block / 2**30:.3f} GiB in fp32, {2 * block / 2**30:.3f} GiB as bf16 copies) "
              "and that block's unsharded gradients before the reduce-scatter. After a step "
              "distnn frees the gradients (zero_grad(set_to_none=True)), which FSDP's sharded "
              "gradients then give back: it holds 12Ψ/N (parameters and Adam), 0.75 × the "
              "formula."]  # fmt: skip
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
    p.add_argument("--width", type=int, default=WIDTH, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    print(markdown(run(args.quick, args.repeats, args.out)))


if __name__ == "__main__":
    main(sys.argv[1:])
