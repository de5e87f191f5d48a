"""DeepSpeed ZeRO: optimizer state (stage 1), gradients (2) and parameters (3) sharded over
the ranks, optionally offloaded to CPU memory, behind the same Strategy as DDP.

distnn owns the accumulation boundary: the engine runs with managed_gradient_accumulation off,
so `backward` accumulates each micro-batch (the loss arrives already divided by accum_steps,
hence scale_wrt_gas=False) and `step` — called once per optimizer step — reduces, clips, steps
the optimizer and the LR schedule. Checkpoints are DeepSpeed's own sharded files, one set per
rank, inside distnn's checkpoint directory (checkpoint.Manager makes that atomic).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distnn.config import Config
from distnn.ema import EMA, Averaging, restore
from distnn.errors import UserError, reason
from distnn.optim import AdamW, Optimizers, Schedule
from distnn.parallel import deepspeed_config
from distnn.parallel.dist import barrier
from distnn.parallel.env import Env
from distnn.parallel.env import export as export_env
from distnn.precision import Precision

TAG = "deepspeed"  # the subdirectory of a checkpoint directory that holds DeepSpeed's files


def _quiet() -> contextlib.ExitStack:
    """DeepSpeed prints config dumps and progress bars on every rank: not ours to show."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    logger = logging.getLogger("DeepSpeed")  # its handler holds the real stderr
    stack.callback(logger.setLevel, logger.level)
    logger.setLevel(logging.ERROR)
    return stack


def require_deepspeed() -> Any:
    """The deepspeed module, set up for this environment, or one line saying how to install it."""
    # JIT-built C++ ops go into a writable venv, not into the ~/.cache shared by every venv
    # and checkout: each compiles against its own paths, so each rebuilt the other's ops (a
    # minute on 2 cores) on every switch. Elsewhere (a system or shared read-only install)
    # torch's default stays.
    if sys.prefix != sys.base_prefix:
        _venv_ninja_first()
        if os.access(sys.prefix, os.W_OK):
            os.environ.setdefault(
                "TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")
            )
    if not torch.cuda.is_available():
        # Its CPU accelerator, chosen without the "unable to detect a GPU" warning.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise UserError(
            f"strategy.name=deepspeed needs the deepspeed package ({e}); "
            "install it with `pip install --no-build-isolation -e '.[deepspeed]'`"
        ) from None
    return deepspeed


def _venv_ninja_first() -> None:
    """torch builds the ops with whichever `ninja` PATH finds first, and ninja rebuilds what
    another version built (1.11 and 1.12+ hash their commands differently): a job whose PATH
    starts with the venv's bin/ (sbatch scripts, launch/, an activated venv) and one that
    does not (`.venv/bin/python -m ...`) rebuilt each other's ops, a minute or two each time
    on 2 cores. The venv's ninja (DeepSpeed installs one) goes first, as activating it does."""
    bin_dir = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (bin_dir / "ninja").is_file() and path.split(os.pathsep)[0] != str(bin_dir):
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), path] if path else [str(bin_dir)])


# The JIT ops distnn's DeepSpeed strategy loads, per accelerator: on CUDA FusedAdam for
# AdamW and CPU Adam for an offloaded optimizer; on CPU CPU Adam, the shared-memory
# all-reduce of DeepSpeed's CPU communication backend, and FusedAdam, what DeepSpeed builds
# for a ds_config "optimizer" of type Adam or AdamW.
OPS = {
    "cuda": ("FusedAdamBuilder", "CPUAdamBuilder"),
    "cpu": ("CPUAdamBuilder", "ShareMemCommBuilder", "FusedAdamBuilder"),
}


def build_ops(strict: bool = False) -> None:
    """Compile the C++ ops distnn uses now (`make setup`), not in the first run that needs
    them: DeepSpeed installs with DS_BUILD_OPS=0 and JIT-builds each, about a minute on 2
    cores. An op this machine cannot build is reported and left to build on first use, or,
    `strict`, raises."""
    accelerator = require_deepspeed().accelerator.get_accelerator()
    for name in OPS.get(accelerator.device_name(), ()):
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"{name}: not available with the {accelerator.device_name()} accelerator")
            continue
        try:
            builder.load(verbose=False)
        except Exception as e:  # a missing compiler or CUDA toolkit: the first use retries
            if strict:
                raise
            print(f"{name}: not built ({e}); it compiles on first use")
            continue
        where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default extensions folder")
        print(f"{builder.absolute_name()}: ready in {where}")


def _check(cfg: Config) -> None:
    """What DeepSpeed's engine cannot do the way distnn's other strategies do."""
    if cfg.train.nonfinite == "skip":
        raise UserError(
            "train.nonfinite=skip is not available with strategy.name=deepspeed (the engine "
            "measures the gradient norm inside its own step); use train.nonfinite=raise"
        )
    if cfg.model.compile:
        raise UserError(
            "model.compile=true is not available with strategy.name=deepspeed; set it to false"
        )
    if cfg.optim.name in ("lamb", "lars"):
        # ZeRO hands the optimizer flat partitions, not layers: the layer-wise trust ratio
        # would be taken over a partition.
        raise UserError(
            f"optim.name={cfg.optim.name} is not available with strategy.name=deepspeed (ZeRO "
            "steps flat partitions, not layers); use strategy.name=ddp or fsdp"
        )
    if cfg.model.grad_checkpointing:
        # Under ZeRO-3 a recomputed block gathers its parameters outside DeepSpeed's own
        # checkpointing (deepspeed.checkpointing), which needs the model written for it.
        raise UserError(
            "model.grad_checkpointing=true is not available with strategy.name=deepspeed; use "
            "strategy.name=fsdp (sharded, with activation checkpointing) or ddp"
        )
    if cfg.log.tensorboard_graph and cfg.strategy.deepspeed.zero_stage == 3:
        # The trace is a forward on rank 0 alone; under ZeRO-3 it gathers parameters in
        # collectives no other rank joins.
        raise UserError(
            "log.tensorboard_graph=true is not available with strategy.deepspeed.zero_stage=3; "
            "set it to false or use zero_stage 0-2"
        )


def _check_engine_config(ds_config: dict[str, Any], world_size: int) -> None:
    """DeepSpeed's own checks of the merged config, run here, before any process group forms,
    so that a combination it refuses is one line rather than its bare AssertionError from every
    rank. Its config object reads the world size from DeepSpeed's process group and, before
    one exists, assumes 1: the batch it checks is scaled to the world it sees."""
    from deepspeed import comm
    from deepspeed.runtime.config import DeepSpeedConfig

    zero = ds_config.get("zero_optimization", {})
    if zero.get("overlap_comm") and zero.get("stage", 0) < 2:
        # The engine's own check, made only in deepspeed.initialize: distnn owns the
        # accumulation boundary, and DeepSpeed overlaps that way only while it partitions
        # gradients.
        raise UserError(
            f"strategy.deepspeed.overlap_comm=true needs strategy.deepspeed.zero_stage 2 or 3 (got "
            f"{zero.get('stage', 0)}): set strategy.deepspeed.overlap_comm=false or raise the stage"
        )
    try:  # as DeepSpeedConfig asks
        seen = comm.get_world_size()
    except (RuntimeError, AssertionError, AttributeError):
        seen = 1
    local = dict(ds_config, train_batch_size=ds_config["train_batch_size"] // world_size * seen)
    try:
        with _quiet():
            DeepSpeedConfig(local)
    except Exception as e:  # AssertionError, ValueError, its DeepSpeedConfigError, KeyError...
        raise UserError(
            f"DeepSpeed refuses the config built from strategy.*: {reason(e)}"
        ) from None


class DeepSpeed:
    collective = True
    meta_init = False  # ZeRO-3 would need deepspeed.zero.Init around the build

    def __init__(self, cfg: Config, env: Env, precision: Precision, device: torch.device) -> None:
        _check(cfg)
        self.deepspeed = require_deepspeed()
        # Built (and checked) before any process group forms.
        self.ds_config = deepspeed_config.build(cfg, env.world_size)
        _check_engine_config(self.ds_config, env.world_size)
        # DeepSpeed builds a ds_config optimizer over one group of all parameters.
        grouped = {"head_lr_scale": cfg.optim.head_lr_scale, "layer_decay": cfg.optim.layer_decay}
        for key, value in grouped.items():
            if "optimizer" in self.ds_config and value != 1.0:
                raise UserError(
                    f"optim.{key} needs distnn's optimizer; the ds_config names DeepSpeed's "
                    f'({self.ds_config["optimizer"].get("type")}): remove its "optimizer" '
                    f"section or set optim.{key}=1"
                )
        self.cfg, self.env, self.precision, self.device = cfg, env, precision, device
        # ZeRO-3 gathers parameters inside every forward: ranks must run them together.
        self.lockstep_forward = self.ds_config["zero_optimization"].get("stage", 0) == 3
        self.engine: Any = None
        self.ema: EMA | None = None
        self.optimizer_name = ""
        self.schedule = "distnn's sched.*"
        self.nchw = cfg.model.channels_last
        self.norm = torch.full((), math.nan, device=device)

    def describe(self) -> str:
        zero = self.ds_config["zero_optimization"]
        offload = [k for k in ("offload_optimizer", "offload_param") if k in zero]
        return (
            f"deepspeed ZeRO-{zero['stage']}"
            + (f" ({', '.join(offload)} to cpu)" if offload else "")
            + f", optimizer {self.optimizer_name}, schedule {self.schedule}, "
            f"{self.env.world_size} process(es)"
            + (", weights NCHW (model.channels_last: inputs only)" if self.nchw else "")
        )

    # --- setup ----------------------------------------------------------------------------

    def setup(
        self,
        model: nn.Module,
        optimizers: Optimizers,
        schedule: Schedule,
        average: Averaging | None = None,
    ) -> nn.Module:
        if self.nchw:
            # DeepSpeed views each parameter's bytes (its broadcast, ZeRO's flat buffers),
            # which needs a last stride of 1: channels_last weights fail there.
            model = model.to(memory_format=torch.contiguous_format)
        # DeepSpeed reads its rank and binds its device from torchrun's variables, which a
        # lone process or an srun task lacks.
        local = self.device.index if self.device.type == "cuda" else self.env.local_rank
        export_env(self.env, local)
        # DeepSpeed's ZeRO calls collectives torch 2.14 renamed: a warning per call.
        renamed = r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated"
        warnings.filterwarnings("ignore", renamed, FutureWarning)
        if "optimizer" in self.ds_config:  # the user's JSON names DeepSpeed's own optimizer
            optimizer = None
            self.optimizer_name = f"{self.ds_config['optimizer'].get('type')} (ds_config)"
        else:
            optimizer = optimizers(model, self._fused_adamw())
            self.optimizer_name = type(optimizer).__name__
        with _quiet():
            self.engine, *_ = self.deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                lr_scheduler=self._schedule(schedule),
                config=self.ds_config,
                dist_init_required=False,
            )
        if average is not None:
            self.ema = average(self.weights, self._regather if self.lockstep_forward else None)
        return self.engine

    def _regather(self) -> None:
        """ZeRO-3 keeps small parameters whole (ds_persist) and gathers them from their
        partitions again only after a step: after the partitions were written in place, gather
        them again (a collective: every rank writes together)."""
        kept = [p for p in self.engine.module.parameters() if getattr(p, "ds_persist", False)]
        if kept:
            kept[0].partition(param_list=kept)  # frees the whole copies; partitions stay
            kept[0].all_gather(param_list=kept)

    def weights(self) -> dict[str, torch.Tensor]:
        return {
            name: _partition(t).detach()
            for name, t in self.engine.module.state_dict(keep_vars=True).items()
        }

    def _schedule(self, schedule: Schedule) -> Schedule | None:
        """The LR schedule for whichever optimizer DeepSpeed ends up stepping (a ds_config
        optimizer is built inside initialize): distnn's, as a factory DeepSpeed applies to it,
        or, where the user's JSON has a "scheduler" section, none: then DeepSpeed's alone
        drives the LR."""
        if "scheduler" in self.ds_config:
            self.schedule = f"{self.ds_config['scheduler'].get('type')} (ds_config; sched.* off)"
            return None
        return schedule

    def _fused_adamw(self) -> AdamW | None:
        """DeepSpeed's fused AdamW where it has one for this run: DeepSpeedCPUAdam when the
        optimizer is offloaded, FusedAdam on CUDA; elsewhere torch's."""
        if self.cfg.strategy.deepspeed.offload_optimizer != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return functools.partial(DeepSpeedCPUAdam, adamw_mode=True)
        if self.device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam

            return functools.partial(FusedAdam, adam_w_mode=True)
        return None

    # --- the step -------------------------------------------------------------------------

    def no_sync(self) -> contextlib.AbstractContextManager:
        # Unmanaged accumulation already keeps gradients local until step() (ZeRO-2/3 reduce
        # each micro-batch into their shards: that is how they partition gradients).
        return contextlib.nullcontext()

    def on_comm(self, mark: Callable[[], None]) -> None:
        pass  # ZeRO reduces inside engine.backward, bucket by bucket: no single seam

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The engine clips inside step() (gradient_clipping = train.clip_grad_norm) and
        measures the norm there: the tensor returned here holds it once step() has run."""
        return self.norm

    def step(self) -> torch.Tensor | None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            self.norm.copy_(norm.reshape(()))
        else:  # a float, or None where no norm was needed (ZeRO-0 in fp32 without clipping)
            self.norm.fill_(math.nan if norm is None else norm)
        if self.precision.name == "fp16":  # the engine's loss scaler may have skipped it
            return torch.tensor(self.engine.was_step_applied(), device=self.device)
        return None

    def discard(self) -> None:
        self.engine.optimizer.zero_grad()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def close(self) -> None:
        # Left to interpreter exit, a DeepSpeed engine sometimes aborts the process there
        # ("terminate called without an active exception"), after the run has succeeded.
        if self.engine is not None:
            with _quiet():
                self.engine.destroy()
            self.engine = self.ema = None

    def unwrap(self) -> nn.Module:
        return self.engine.module

    # --- checkpoints ----------------------------------------------------------------------

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its shard of the model and optimizer under directory/TAG. A rank
        whose write fails (a full disk) raises only once the others are done, so that the
        checkpoint manager can tell them all."""
        try:
            with _quiet():
                self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        except (OSError, RuntimeError):
            # The barrier that ends save_checkpoint, after every write: the ranks whose
            # writes went through wait in it.
            barrier()
            raise
        if self.ema is not None and self.lockstep_forward:  # after the last collective
            torch.save(self._ema_partition(), ema_file(directory, self.env.rank))

    def _ema_partition(self) -> dict[str, Any]:
        """This rank's EMA under ZeRO-3: its partition of each parameter's average (buffers,
        not partitioned, whole) and the parameters' full shapes, to merge them by."""
        module = self.engine.module
        return {
            "weights": self.ema.state_dict(),
            "shapes": {
                n: list(p.ds_shape) for n, p in module.named_parameters() if _partition(p) is not p
            },
        }

    def state_dict(self) -> dict[str, Any]:
        # The model, optimizer, scheduler and loss scale are in the shards; so is a ZeRO-3
        # EMA, whose every rank holds a part. Below ZeRO-3 every rank holds the whole EMA.
        whole = self.ema is not None and not self.lockstep_forward
        return {
            "format": "deepspeed",
            "zero_stage": self.ds_config["zero_optimization"]["stage"],
            "world_size": self.env.world_size,
            "ema": self.ema.state_dict() if whole else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "deepspeed":
            raise UserError("the checkpoint was not written by strategy.name=deepspeed")
        stage = self.ds_config["zero_optimization"]["stage"]
        if state["zero_stage"] != stage:  # (the world size was checked before the group formed)
            raise UserError(
                f"checkpoint {state['shards']!r} holds ZeRO-{state['zero_stage']} shards, this "
                f"run is ZeRO-{stage}: resume with "
                f"strategy.deepspeed.zero_stage={state['zero_stage']}"
            )
        with _quiet():
            path, _ = self.engine.load_checkpoint(state["shards"], tag=TAG)
        if path is None:
            raise UserError(f"no DeepSpeed shards under {state['shards']}/{TAG}")
        averages = state.get("ema")
        partition = ema_file(state["shards"], self.env.rank)
        if averages is None and self.lockstep_forward and partition.is_file():
            averages = torch.load(partition, map_location=self.device, weights_only=True)["weights"]
        restore(self.ema, averages)


def _partition(t: torch.Tensor) -> torch.Tensor:
    """What a ZeRO-3 rank holds of a parameter: its partition (ds_tensor); other tensors
    whole."""
    partition = getattr(t, "ds_tensor", None)
    return t if partition is None else partition


def ema_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / TAG / f"ema_rank_{rank:05d}.pt"


def consolidate(directory: str | Path, part: str = "model") -> dict[str, torch.Tensor]:
    """The full fp32 model state_dict from a checkpoint's shards, loadable strict into the
    plain model: DeepSpeed's zero_to_fp32 merges the fp32 master shards; without ZeRO the
    engine saved the whole module. Part "ema": a ZeRO-3 EMA's partitions, merged."""
    if part == "ema":
        return _merge_ema(directory)
    require_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files = Path(directory) / TAG
    if not any(files.glob("*_optim_states.pt")):
        # Tensors and plain values: the safe loader reads it (the ZeRO optimizer files it
        # would need below hold DeepSpeed's classes: checkpoint_files.load_file gates those).
        module = torch.load(
            files / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
        )["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    with _quiet():
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)


def _merge_ema(directory: str | Path) -> dict[str, torch.Tensor]:
    """Each parameter's EMA from every rank's partition: ZeRO-3 splits a parameter flat, padded
    to a multiple of the world size, rank r holding the r-th piece."""
    files = sorted((Path(directory) / TAG).glob("ema_rank_*.pt"))
    if not files:
        raise UserError(f"checkpoint {str(directory)!r} holds no EMA weights")
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    shapes, merged = parts[0]["shapes"], {}
    for name, first in parts[0]["weights"].items():
        if name not in shapes:  # a buffer: whole on every rank
            merged[name] = first
            continue
        flat = torch.cat([p["weights"][name].reshape(-1) for p in parts])
        merged[name] = flat[: math.prod(shapes[name])].view(shapes[name])
    return merged
