"""Whether a checkpoint can continue this run, and what differs if it does: the checks run
before any process group forms, the notes are printed once the run resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distnn.config import Config, global_batch
from distnn.errors import UserError
from distnn.parallel import formats


def check_compatible(
    state: dict[str, Any], cfg: Config, classes: list[str], path: Path | None, world_size: int
) -> None:
    """A checkpoint of another model or dataset cannot continue this run: say which key.
    Sharded state (ZeRO) also needs the world size that wrote it."""
    saved = state["config"]
    checks = [
        ("model.name", cfg.model.name, saved["model"]["name"]),
        ("model.kwargs", cfg.model.kwargs, saved["model"].get("kwargs", {})),
        # The optimizer's parameter groups follow these: another split cannot load its state.
        ("model.freeze", cfg.model.freeze, saved["model"].get("freeze", [])),
        ("model.head", cfg.model.head, saved["model"].get("head", "")),
        ("optim.head_lr_scale", cfg.optim.head_lr_scale, saved["optim"].get("head_lr_scale", 1.0)),
        ("optim.layer_decay", cfg.optim.layer_decay, saved["optim"].get("layer_decay", 1.0)),
        ("optim.name", cfg.optim.name, saved["optim"]["name"]),
        ("data.image_size", cfg.data.image_size, saved["data"]["image_size"]),
        ("number of classes", len(classes), len(state["classes"])),
    ]
    strategy = state["strategy"]
    if "shards" in strategy and not formats.of(strategy).any_world_size:
        then = strategy["world_size"]
        if then != world_size:
            raise UserError(
                f"checkpoint {str(path)!r} holds {strategy['format']} shards of processes={then}, "
                f"this run has {world_size}: they load only at the world size that wrote them; "
                f"resume on {then} processes (FSDP and DDP checkpoints load at any world size)"
            )
    for key, now, then in checks:
        if now != then:
            raise UserError(
                f"checkpoint {str(path)!r} was trained with {key}={then}, this run has {now}; "
                "use another run.name or ckpt.resume=never"
            )


def resume_notes(state: dict[str, Any], cfg: Config, world_size: int) -> list[str]:
    """What makes this resume differ from the uninterrupted run, one line each. Every source,
    shards included, orders samples by global batch (data/order.py) whatever data.workers is:
    at another world size the same global batches follow where the global batch and
    accum_steps are kept."""
    then = state.get("world_size", len(state["rng"]))  # older checkpoints: one RNG per rank
    notes = []
    if then != world_size:
        saved = state["config"]["train"]
        before = saved["batch_size"] * saved["accum_steps"] * then
        after = global_batch(cfg, world_size)
        head = f"note: the checkpoint was written by {then} processes, this run has {world_size}"
        if before == after and saved["accum_steps"] == cfg.train.accum_steps:
            notes.append(
                f"{head}: the same global batches of {after} follow, so it continues the "
                "uninterrupted run (up to reduction order; each rank's random streams, such as "
                "dropout, and its BatchNorm statistics differ)"
            )
        else:
            detail = (
                f"the global batch changes from {before} to {after}"
                if before != after
                else "train.accum_steps changes"
            )
            notes.append(
                f"{head}: it continues, but not exactly as an uninterrupted run ({detail}); "
                f"resume on {then} processes for that"
            )
        if cfg.train.mixup_alpha or cfg.train.cutmix_alpha:
            notes.append(
                "note: MixUp/CutMix pair samples within each process's micro-batch: at another "
                "world size the pairs, and so the loss curve, differ"
            )
    if cfg.train.ema_decay and not state["config"]["train"].get("ema_decay"):
        notes.append("note: the checkpoint holds no EMA: it starts from the resumed weights")
    return notes
