"""The training loop's stall per checkpoint with ckpt.remote against the local save alone.

    python -m benchmarks.ckpt_remote [--quick] [--repeats 4] [--out benchmarks/results]

The models the issue names: torchvision's ResNet-18 (11.7 M parameters) and the 101 M-parameter
MLP of benchmarks/zero_memory.py (6 × Linear 4096→4096), each trained with AdamW by a plain loop
(batch 8) that checkpoints through distnn's own `checkpoint.Manager` every `--every` steps:
model, optimizer state and position, as a run's checkpoint holds them. One Manager writes
locally only, the other also uploads to moto's S3 server on 127.0.0.1 (tests/object_store.py),
in the background. Each repeat trains and saves once with each, local then remote, then remote
then local (ABBA), each side's upload done before the other side trains. Figures: the stall (the
time `save` takes, which is what the loop waits for), the time of the training steps after a
save (the upload competes with them for the CPU), and how long the upload ran on after those
steps.
--quick: a 2 × 1024 MLP and a small CNN, for the tests.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import describe, machine, parser, save, spread, summarize


def models(quick: bool) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name → (model, one input batch)."""
    import torchvision

    def mlp(width: int, layers: int) -> nn.Module:
        blocks = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())]
        return nn.Sequential(*blocks[:-1])

    if quick:
        cnn = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        return {"MLP 2×1024": (mlp(1024, 2), torch.randn(8, 1024)),
                "small CNN": (cnn, torch.randn(8, 3, 16, 16))}  # fmt: skip
    return {"ResNet-18": (torchvision.models.resnet18(), torch.randn(8, 3, 64, 64)),
            "MLP 6×4096 (101 M)": (mlp(4096, 6), torch.randn(8, 4096))}  # fmt: skip


def run(quick: bool, repeats: int, every: int, out: Path) -> dict:
    from tests.object_store import S3Server

    torch.manual_seed(0)
    results = {"machine": machine(), "quick": quick, "repeats": repeats, "every": every,
               "rows": []}  # fmt: skip
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        (base / "empty").mkdir()
        server = S3Server(base / "moto.log", base / "empty", "bench", gated=False)
        os.environ.update(server.env)
        try:
            for name, (model, x) in models(quick).items():
                row = measure(name, model, x, repeats, every, server.root, base / name)
                row.update(upload_cpu(server, base / name / "local" / "checkpoints"))
                results["rows"].append(row)
        finally:
            server.stop()
    return save(out, "ckpt_remote", results, markdown)


def upload_cpu(server, checkpoints: Path) -> dict:
    """CPU seconds one upload of the newest checkpoint costs this process (hashing and
    sending) and the S3 server, measured alone: on this machine the server shares the cores
    with training, which a bucket elsewhere does not."""
    import resource

    from distnn.checkpoint_files import NAME
    from distnn.checkpoint_remote import Mirror, empty_index

    def server_cpu() -> float:
        fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def own_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    from distnn import storage

    newest = max(p for p in checkpoints.iterdir() if NAME.match(p.name))
    mirror = Mirror(storage.Remote(f"{server.root}/cpu"), checkpoints, 1, empty_index())
    mirror.submit(newest, best=False)  # a warm-up: the client is made on the first call
    mirror.wait()
    client, served = own_cpu(), server_cpu()
    mirror.submit(newest, best=False)
    mirror.wait()
    figures = {"client_cpu_s": own_cpu() - client, "server_cpu_s": server_cpu() - served}
    mirror.close()
    return figures


def measure(name: str, model: nn.Module, x: torch.Tensor, repeats: int, every: int, url: str,
            tmp: Path) -> dict:  # fmt: skip
    from distnn import checkpoint
    from distnn.config import CkptConfig

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = 0

    def train(steps: int) -> float:
        nonlocal step
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            opt.step()
            step += 1
        return (time.perf_counter() - start) / steps

    managers = {}
    for kind, remote in (("local", ""), ("remote", f"{url}/{name.split()[0]}")):
        managers[kind] = checkpoint.Manager(CkptConfig(keep=2, remote=remote), tmp / kind, True)
        managers[kind].discard_lost(None)  # starts the uploader
    train(2)  # warm-up: the optimizer state exists, as in a run's checkpoint
    figures: dict[str, dict[str, list[float]]] = {
        kind: {"stall": [], "steps": [], "drain": []} for kind in managers
    }
    for k in range(repeats):
        for kind in ("local", "remote") if k % 2 == 0 else ("remote", "local"):
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "position": {"step": step}}  # fmt: skip
            start = time.perf_counter()
            managers[kind].save(state, step)
            figures[kind]["stall"].append(time.perf_counter() - start)
            # The steps after a save: with ckpt.remote, while its upload runs.
            figures[kind]["steps"].append(train(every))
            start = time.perf_counter()
            managers[kind].finish(torch.device("cpu"))  # the other side's steps run alone
            figures[kind]["drain"].append(time.perf_counter() - start)
    for m in managers.values():
        m.close()
    size = managers["local"].saved()[-1].stat().st_size
    local, remote = figures["local"], figures["remote"]
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
           "checkpoint_bytes": size, "stall_local": summarize(local["stall"]),
           "stall_remote": summarize(remote["stall"]), "step_local": summarize(local["steps"]),
           "step_remote": summarize(remote["steps"]),
           "drain_s": summarize(remote["drain"])}  # fmt: skip
    row["stall_ratio"] = row["stall_remote"]["median"] / row["stall_local"]["median"]
    row["step_ratio"] = row["step_remote"]["median"] / row["step_local"]["median"]
    print(f"{name:20} stall: local {row['stall_local']['median']:.3f} s, with ckpt.remote "
          f"{row['stall_remote']['median']:.3f} s ({row['stall_ratio']:.2f}×); steps during "
          f"the upload {row['step_ratio']:.2f}×; upload done {row['drain_s']['median']:.1f} s "
          f"after {every} steps", flush=True)  # fmt: skip
    return row


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# The training loop's stall per checkpoint: ckpt.remote (S3) vs the local save alone",
        "",
        f"{describe(m)}{' (quick run)' if results['quick'] else ''} AdamW, batch 8, a "
        f"checkpoint every {results['every']} steps through checkpoint.Manager; moto's S3 "
        f"server on 127.0.0.1. {results['repeats']} checkpoints per side, ABBA order: median "
        "(min – max) seconds. Step time ratio: the steps after a save, while its upload runs in "
        "the background, over the same steps after a local save; on this machine the S3 server "
        "shares the 2 cores with training, and the upload CPU column (one upload, measured "
        "alone) says how much of that cost is the server's. Upload left: how long the "
        "upload still ran after those steps (the next save would not wait for it: it would "
        "supersede the one waiting).",
        "",
        "| model | checkpoint | stall, local | stall, ckpt.remote | ratio | step time ratio "
        "| upload CPU s: distnn, S3 server "
        "| upload left (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['model']} | {r['checkpoint_bytes'] / 2**20:,.0f} MiB "
        f"| {spread(r['stall_local'], '.3f')} | {spread(r['stall_remote'], '.3f')} "
        f"| {r['stall_ratio']:.2f} | {r['step_ratio']:.2f} "
        f"| {r['client_cpu_s']:.2f}, {r['server_cpu_s']:.2f} | {spread(r['drain_s'], '.1f')} |"
        for r in results["rows"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser("benchmarks.ckpt_remote", __doc__, "a CI-sized run (small models)")
    p.add_argument("--every", type=int, default=10, help="training steps between checkpoints")
    args = p.parse_args(argv)
    run(args.quick, args.repeats, args.every, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
