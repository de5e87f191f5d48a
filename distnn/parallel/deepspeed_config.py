"""The DeepSpeed config, derived from distnn's: one source of truth for batch sizes.

A user's JSON (`strategy.deepspeed.ds_config`, e.g. from DeepSpeedExamples) is merged over the
generated config: `"auto"` values take ours, other values win, except the batch sizes, which
must agree with world size × train.batch_size × train.accum_steps or the run is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distnn.config import Config
from distnn.errors import UserError
from distnn.optim import peak_lr

# distnn calls backward once per micro-batch and step once per optimizer step: the step is the
# accumulation boundary, so DeepSpeed must not count micro-batches on its own as well.
_UNMANAGED = {"managed_gradient_accumulation": False}


def generate(cfg: Config, world_size: int) -> dict[str, Any]:
    s, t = cfg.strategy.deepspeed, cfg.train
    zero: dict[str, Any] = {
        "stage": s.zero_stage,
        "overlap_comm": s.overlap_comm,
        "contiguous_gradients": s.contiguous_gradients,
        "reduce_bucket_size": s.reduce_bucket_size,
        "allgather_bucket_size": s.allgather_bucket_size,
    }
    if s.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = s.allgather_bucket_size
    for key, device in (
        ("offload_optimizer", s.offload_optimizer),
        ("offload_param", s.offload_param),
    ):
        if device != "none":
            zero[key] = {"device": device, "pin_memory": s.offload_pin_memory}
    return {
        "train_batch_size": t.batch_size * t.accum_steps * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.accum_steps,
        **_UNMANAGED,
        "gradient_clipping": t.clip_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # Dynamic loss scaling as torch's GradScaler does it: start at 2^16, halve on overflow,
        # double after 1000 clean steps.
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # distnn's optimizer may be any torch optimizer (SGD included), ZeRO wraps it.
        "zero_allow_untested_optimizer": True,
        # With optimizer offload and a torch optimizer other than Adam (no DeepSpeedCPUAdam for
        # it), the torch optimizer steps the CPU copy.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # distnn logs; DeepSpeed's own progress lines stay off
        "wall_clock_breakdown": False,
    }


def _fill(user: Any, ours: Any, path: str) -> Any:
    """`user` with every "auto" replaced by the value at the same place in `ours`."""
    if user == "auto":
        if ours is None:
            raise UserError(
                f"strategy.deepspeed.ds_config sets {path}='auto' but distnn has no value for it; "
                "set it explicitly"
            )
        return ours
    if isinstance(user, dict):
        ours = ours if isinstance(ours, dict) else {}
        merged = dict(ours)
        for key, value in user.items():
            merged[key] = _fill(value, ours.get(key), f"{path}.{key}" if path else key)
        return merged
    return user


_BATCH_KEYS = {
    "train_batch_size": "world size × train.batch_size × train.accum_steps",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.accum_steps",
}


def merge(generated: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    for key, ours_from in _BATCH_KEYS.items():
        theirs = user.get(key, "auto")
        if theirs != "auto" and theirs != generated[key]:
            raise UserError(
                f"strategy.deepspeed.ds_config sets {key}={theirs!r}, but distnn's {ours_from} "
                f'gives {generated[key]}; set it to "auto" or change distnn\'s config'
            )
    merged = _fill(user, generated, "")
    merged.update(_UNMANAGED)
    return merged


def read_user(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"strategy.deepspeed.ds_config={path!r} does not exist")
    try:
        user = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"strategy.deepspeed.ds_config={path!r} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise UserError(f"strategy.deepspeed.ds_config={path!r} must hold a JSON object")
    return user


def build(cfg: Config, world_size: int) -> dict[str, Any]:
    """The config handed to deepspeed.initialize."""
    ds = cfg.strategy.deepspeed
    if ds.offload_param != "none" and ds.zero_stage != 3:
        raise UserError(
            f"strategy.deepspeed.offload_param={ds.offload_param} needs "
            f"strategy.deepspeed.zero_stage=3 (got {ds.zero_stage}): only ZeRO-3 partitions "
            "parameters"
        )
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        raise UserError(
            "strategy.deepspeed.offload_optimizer=cpu needs strategy.deepspeed.zero_stage 1, 2 "
            "or 3 (got 0)"
        )
    ours = generate(cfg, world_size)
    if not cfg.strategy.deepspeed.ds_config:
        return ours
    user = read_user(cfg.strategy.deepspeed.ds_config)
    if "optimizer" in user:  # DeepSpeed's own optimizer: "auto" hyperparameters are distnn's
        o = cfg.optim
        ours["optimizer"] = {
            "params": {
                "lr": peak_lr(o, ours["train_batch_size"]),
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
            }
        }
    return merge(ours, user)
