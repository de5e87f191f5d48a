"""Typed configuration: nested dataclasses, YAML presets, dotted `key=value` overrides.

Every default lives here, once. `load()` is the only way a Config is made from user input, so
every key and value the trainer sees has been checked against these declarations.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distnn import storage
from distnn.errors import UserError
from distnn.imports import is_import_path

# data.source names with a reader of their own; "python" records datasets given to distnn.fit.
BUILTIN_SOURCES = ("synthetic", "cifar10", "cifar100", "imagefolder", "shards", "python")


def _f(default: Any, help: str) -> Any:
    """A field with its help text; the help feeds `--help-config` and the README table."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class RunConfig:
    name: str = _f("default", "run name; the run directory is <run.dir>/<run.name>/")
    dir: str = _f("runs", "parent directory of run directories")


@dataclass
class ModelConfig:
    name: str = _f(
        "tutorial_cnn",
        "zoo name (python -m distnn.models lists them), tv:<name>, timm:<name> or "
        "pkg.module:callable",
    )
    kwargs: dict[str, Any] = _f({}, "keyword arguments of the model's builder (model.kwargs.k=v)")
    num_classes: int | None = _f(None, "classes; default: from the data")
    init: Literal["default", "kaiming_normal", "xavier_uniform", "trunc_normal"] = _f(
        "default", "re-initialise conv and linear weights (biases 0, norms 1) after building"
    )
    init_from: str = _f(
        "", "weights to start a new run from: run dir, checkpoint, export, .pt/.pth, .safetensors"
    )
    init_from_trusted: bool = _f(
        False, "let init_from unpickle a file the safe loader refuses (runs any code it names)"
    )
    head: str = _f("", "classifier module name (default: the last layer with num_classes outputs)")
    freeze: list[str] = _f([], "parameter name prefixes that do not train (model.freeze=a,b)")
    channels_last: bool = _f(False, "NHWC memory format (faster convs on CUDA tensor cores)")
    compile: bool = _f(False, "torch.compile the model")
    grad_checkpointing: bool = _f(
        False, "recompute each block's activations in backward (less memory, ~1.3x compute)"
    )


@dataclass
class DataConfig:
    source: str = _f(
        "synthetic",
        "synthetic | cifar10 | cifar100 | imagefolder | shards | pkg.module:callable "
        "(called with split=, root=, **data.kwargs)",
    )
    kwargs: dict[str, Any] = _f({}, "keyword arguments of a pkg.module:callable source")
    root: str = _f(
        "data", "dataset directory (cifar-10-batches-py's parent, train/ val/, or shards)"
    )
    image_size: int = _f(32, "side of the square training crop, pixels")
    hflip: bool = _f(True, "random horizontal flips in training (off for digits, text)")
    augment: Literal["basic", "randaugment", "trivialaugment", "autoaugment", "augmix"] = _f(
        "basic",
        "training augmentation: basic = random crop + flip only; the others add torchvision's "
        "policy after them (autoaugment: the CIFAR-10 policy up to 64 px, ImageNet's above)",
    )
    augment_ops: int = _f(2, "randaugment: operations per image")
    augment_magnitude: int = _f(
        9, "randaugment: magnitude, 0-30 (torchvision's 31 bins); augmix: severity, 1-10"
    )
    color_jitter: float = _f(
        0.0, "training: brightness, contrast and saturation jitter of this strength (0: off)"
    )
    random_erasing: float = _f(
        0.0,
        "training: probability of erasing a random rectangle (torchvision's RandomErasing) to "
        "the dataset mean, i.e. 0 after normalisation",
    )
    workers: int | None = _f(
        None, "DataLoader worker processes per rank (default: this node's CPUs ÷ its ranks, ≤ 8)"
    )
    prefetch_factor: int = _f(2, "batches each worker loads ahead")
    download: bool = _f(False, "download CIFAR with torchvision when missing (needs internet)")
    verify: bool = _f(
        False, "shards: check each shard's sha256 and sample count against the manifest first"
    )
    on_error: Literal["skip", "raise"] = _f(
        "skip", "an unreadable sample (any source) is skipped and counted, or stops the run"
    )
    max_pixels: int = _f(
        64 * 2**20,
        "an image with more pixels (width × height, from its header, before decoding) is an "
        "unreadable sample, any source",
    )
    max_shard_bytes: int = _f(
        512 * 2**20,
        "shards: the most bytes a worker holds of one shard (a compressed tar's inflated "
        "members, 2 shards at a time; a plain tar's member); past it, unreadable samples",
    )
    timeout_s: float = _f(
        600.0,
        "workers: no batch for this long ends the run in one line naming the shard being read "
        "(0: wait forever)",
    )
    streams: int = _f(
        1,
        "shards: global batches drawn from this many streams of the epoch's shards, one run each "
        "(a node reads only its streams' shards; 1: one stream, every rank reads every shard)",
    )
    storage_options: dict[str, Any] = _f(
        {},
        "data.root as a URL: fsspec options the AWS environment and files cannot say "
        "(data.storage_options.client_kwargs.region_name=...); secrets in it are never written",
    )
    cache_dir: str = _f(
        "",
        "data.root as a URL: node-local directory its shards are downloaded to (default: "
        "$SLURM_TMPDIR, else $TMPDIR or /tmp, then distnn-cache-<uid>, 0700)",
    )
    cache_limit: int = _f(
        0,
        "data.root as a URL: bytes the node's cache may hold (0: no limit); the shard needed "
        "furthest ahead goes first",
    )
    prefetch_shards: int = _f(
        4, "data.root as a URL: the shards of this many batches ahead download in the background"
    )
    retry_s: float = _f(
        120.0, "data.root as a URL: how long failed reads are retried before the run stops"
    )
    synthetic_train: int = _f(2048, "synthetic: training samples")
    synthetic_val: int = _f(512, "synthetic: validation samples")
    synthetic_classes: int = _f(10, "synthetic: number of classes")

    def __post_init__(self) -> None:
        # The augmentation keys' ranges, checked where they are declared: a DataConfig made in
        # Python is held to them too.
        augmix = self.augment == "augmix"
        low, high, scale = (1, 10, "AugMix's severity") if augmix else (0, 30, "of 31 bins")
        checks = (
            ("augment_ops", self.augment_ops, self.augment_ops >= 1, ">= 1"),
            ("augment_magnitude", self.augment_magnitude, low <= self.augment_magnitude <= high,
             f"in {low}..{high} ({scale})"),
            ("color_jitter", self.color_jitter, self.color_jitter >= 0, ">= 0"),
            ("random_erasing", self.random_erasing, 0 <= self.random_erasing <= 1,
             "a probability in [0, 1]"),
            ("max_pixels", self.max_pixels, self.max_pixels >= 1, ">= 1"),
            ("max_shard_bytes", self.max_shard_bytes, self.max_shard_bytes >= 1, ">= 1"),
            ("timeout_s", self.timeout_s, self.timeout_s >= 0, ">= 0 (0: no timeout)"),
            ("streams", self.streams, self.streams >= 1, ">= 1"),
            ("cache_limit", self.cache_limit, self.cache_limit >= 0, ">= 0 (0: no limit)"),
            ("prefetch_shards", self.prefetch_shards, self.prefetch_shards >= 0, ">= 0"),
            ("retry_s", self.retry_s, self.retry_s >= 0, ">= 0"),
        )  # fmt: skip
        for key, value, ok, valid in checks:
            if not ok:
                raise UserError(f"config key 'data.{key}' must be {valid}, got {value}")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "lamb", "lars"] = _f(
        "sgd", "optimizer; lamb (Adam-based) and lars (SGD-based): large global batches"
    )
    lr: float = _f(0.1, "peak learning rate")
    momentum: float = _f(0.9, "SGD and LARS momentum")
    nesterov: bool = _f(False, "SGD and LARS Nesterov momentum")
    weight_decay: float = _f(5e-4, "weight decay (never applied to norm layers and biases)")
    betas: list[float] = _f([0.9, 0.999], "AdamW and LAMB betas")
    eps: float = _f(1e-8, "AdamW and LAMB epsilon")
    trust_coeff: float = _f(
        0.001,
        "LARS trust coefficient: a layer's LR is lr × trust_coeff × ‖w‖ / (‖g‖ + weight_decay·‖w‖)",
    )
    scale_lr: bool = _f(False, "scale lr by global batch / base_batch (linear scaling rule)")
    base_batch: int = _f(256, "global batch at which optim.lr applies unscaled")
    head_lr_scale: float = _f(1.0, "LR multiplier of the classifier head (fine-tuning: e.g. 10)")
    layer_decay: float = _f(
        1.0,
        "layer-wise LR decay of timm models: layer i of L trains at lr × layer_decay^(L-i) "
        "(1: off; ViT fine-tuning: 0.65-0.75)",
    )


@dataclass
class SchedConfig:
    name: Literal["cosine", "step", "constant"] = _f("cosine", "LR schedule after warmup")
    warmup_steps: int = _f(0, "linear warmup, in optimizer steps")
    min_lr_ratio: float = _f(0.0, "cosine: final LR as a fraction of optim.lr")
    step_size: int = _f(0, "step: optimizer steps between decays (0: a third of the run)")
    gamma: float = _f(0.1, "step: decay factor")


@dataclass
class TrainConfig:
    batch_size: int = _f(128, "per-process micro-batch")
    global_batch: int = _f(0, "if set: batch_size = global_batch / (world size × accum_steps)")
    accum_steps: int = _f(1, "micro-batches per optimizer step")
    epochs: int = _f(1, "passes over the training set")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: run all epochs)")
    seed: int = _f(0, "seed of weights, sample order and augmentation")
    log_every: int = _f(10, "optimizer steps between metric records")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    clip_grad_norm: float = _f(0.0, "clip the global gradient norm to this (0: off)")
    eval_every: int = _f(1, "epochs between evaluations (the last epoch always evaluates)")
    deterministic: bool = _f(False, "deterministic kernels (slower)")
    nonfinite: Literal["raise", "skip"] = _f(
        "raise",
        "non-finite loss: raise (checked at log intervals, no per-step sync) or skip the step "
        "(checked every step: one host sync per step)",
    )
    max_skips: int = _f(10, "nonfinite=skip: raise after this many skipped steps")
    mixup_alpha: float = _f(
        0.0, "MixUp: Beta(α, α) mixing of batch pairs (0: off; timm recipes 0.1-0.8)"
    )
    cutmix_alpha: float = _f(
        0.0, "CutMix: Beta(α, α) box of the paired image (0: off; typically 1.0)"
    )
    mix_prob: float = _f(1.0, "probability that a batch is mixed when MixUp or CutMix is on")
    mix_switch_prob: float = _f(
        0.5, "with both on: probability that a mixed batch takes CutMix rather than MixUp"
    )
    ema_decay: float = _f(
        0.0, "EMA of the weights, evaluated beside them as val_*_ema (0: off; e.g. 0.9998)"
    )
    ema_warmup: bool = _f(False, "ramp the EMA decay up from 0 (timm's warmup: 1-(1+n)^-2/3)")
    ema_every: int = _f(1, "optimizer steps between EMA updates")


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = _f("auto", "auto: nccl on CUDA, gloo on CPU")
    timeout_s: float = _f(600.0, "timeout of process-group setup and every collective")
    hang_s: float | None = _f(
        None,
        "a rank that makes no progress this long writes its stacks to <run dir>/hang/ and the "
        "job names the rank that is stuck (default: 3/4 of timeout_s; 0: no watchdog)",
    )

    def __post_init__(self) -> None:
        if self.hang_s is not None and self.hang_s < 0:
            raise UserError(f"config key 'dist.hang_s' must be >= 0 (0: off), got {self.hang_s}")

    @property
    def hang_after_s(self) -> float:
        """Seconds without progress before the watchdog reports; 0: never."""
        return self.timeout_s * 0.75 if self.hang_s is None else self.hang_s


@dataclass
class DDPConfig:
    bucket_cap_mb: float = _f(25.0, "gradient bucket size, MiB")
    gradient_as_bucket_view: bool = _f(True, "gradients alias the buckets (saves a copy)")
    static_graph: bool = _f(False, "the graph is the same every step (enables optimisations)")
    find_unused_parameters: bool = _f(False, "allow parameters that get no gradient")
    broadcast_buffers: bool = _f(True, "rank 0's buffers (BN stats) sent every forward")
    sync_batchnorm: bool = _f(False, "convert BatchNorm to SyncBatchNorm (CUDA)")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = _f(
        2, "ZeRO stage (1 optimizer state, 2 +gradients, 3 +parameters sharded)"
    )
    offload_optimizer: Literal["none", "cpu"] = _f(
        "none", "optimizer state and step on the CPU (ZeRO 1-3)"
    )
    offload_param: Literal["none", "cpu"] = _f("none", "parameters on the CPU (ZeRO 3)")
    offload_pin_memory: bool = _f(True, "pinned CPU buffers for offload (CUDA)")
    overlap_comm: bool = _f(False, "overlap gradient reduction with backward (ZeRO 2-3)")
    contiguous_gradients: bool = _f(True, "copy gradients into one buffer")
    reduce_bucket_size: int = _f(500_000_000, "elements per gradient reduction")
    allgather_bucket_size: int = _f(500_000_000, "elements per parameter all-gather")
    ds_config: str = _f("", "JSON merged over the generated config ('auto' = ours)")


@dataclass
class FSDPConfig:
    blocks: list[str] = _f(
        [],
        "module classes sharded one by one (default: the model family's blocks, else its "
        "top-level children; a model's own `fsdp_blocks` attribute wins)",
    )
    reshard_after_forward: bool = _f(True, "free gathered blocks after forward (less memory)")
    reduce_fp32: bool = _f(True, "reduce gradients in fp32 under bf16/fp16 precision")
    offload: Literal["none", "cpu"] = _f("none", "parameters, gradients and optimizer on CPU")
    meta_init: bool = _f(
        True,
        "build on the meta device and initialise shard by shard (no rank holds the whole "
        "model; the same weights as an eager build)",
    )


@dataclass
class StrategyConfig:
    name: Literal["auto", "single", "ddp", "deepspeed", "fsdp"] = _f(
        "auto", "auto: ddp above one process, else single"
    )
    ddp: DDPConfig = _section(DDPConfig, "DistributedDataParallel")
    deepspeed: DeepSpeedConfig = _section(DeepSpeedConfig, "DeepSpeed ZeRO")
    fsdp: FSDPConfig = _section(FSDPConfig, "FSDP2 (fully_shard)")


# Keys that moved into a strategy's own section: the old spelling gets one line naming the new.
MOVED = {
    f"strategy.{f.name}": f"strategy.{section}.{f.name}"
    for section, cls in (("ddp", DDPConfig), ("deepspeed", DeepSpeedConfig))
    for f in dataclasses.fields(cls)
}


@dataclass
class CkptConfig:
    every_steps: int = _f(0, "checkpoint every N optimizer steps (0: off)")
    epoch_end: bool = _f(True, "checkpoint at the end of every epoch")
    keep: int = _f(3, "checkpoints kept (the newest)")
    resume: str = _f("auto", "auto (newest valid in the run dir) | never | PATH")
    resume_trusted: bool = _f(
        False, "let resume unpickle a checkpoint the safe loader refuses (runs any code it names)"
    )
    best_metric: str = _f("val_top1", "eval metric that picks checkpoints/best.pt")
    best_mode: Literal["max", "min"] = _f("max", "whether a larger best_metric is better")
    requeue: bool = _f(True, "on preemption under Slurm, rank 0 runs scontrol requeue")
    export_ema: bool = _f(
        False, "export (and W&B's model.safetensors) takes the EMA weights (train.ema_decay > 0)"
    )
    remote: str = _f(
        "",
        "URL each checkpoint is uploaded to in the background (s3://bucket/runs/NAME, any fsspec "
        "URL); resume=auto downloads the newest complete one where the run directory lacks it",
    )
    storage_options: dict[str, Any] = _f(
        {}, "ckpt.remote: fsspec options, as data.storage_options; secrets in it are never written"
    )
    retry_s: float = _f(
        300.0, "ckpt.remote: how long a failed upload or download is retried before it gives up"
    )
    upload_wait_s: float = _f(
        80.0,
        "ckpt.remote, on preemption: how long the exit waits for uploads before it requeues "
        "anyway (inside Slurm's notice and torchrun's shutdown timeout)",
    )

    def __post_init__(self) -> None:
        url = storage.is_url(self.remote) and not self.remote.startswith(storage.PIPE)
        if self.remote and not url:
            raise UserError(
                f"ckpt.remote={self.remote!r} is not a URL: give s3://bucket/prefix, "
                "http(s)://host/path (a server that takes PUT), file:///path or another fsspec URL"
            )
        for key in ("retry_s", "upload_wait_s"):
            if getattr(self, key) < 0:
                raise UserError(f"config key 'ckpt.{key}' must be >= 0, got {getattr(self, key)}")


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = _f(
        "auto", "W&B logging (auto: online with credentials, else offline; never prompts)"
    )
    project: str = _f("distnn", "W&B project")
    entity: str | None = _f(None, "W&B entity (team or user); default: the account's")
    group: str | None = _f(None, "W&B run group; default: run.name")
    tags: list[str] = _f([], "W&B run tags (tags=a,b on the command line)")
    notes: str = _f("", "W&B run notes")
    log_checkpoints: bool = _f(
        False, "upload the final model (<run dir>/model.safetensors) as an artifact"
    )
    init_timeout_s: float = _f(30.0, "online: seconds to reach the server, then log offline")


@dataclass
class MonitorConfig:
    straggler_ratio: float = _f(
        1.2, "a rank slower than the median rank by more than this is a straggler"
    )
    straggler_intervals: int = _f(
        3, "log intervals in a row a rank must be slow before the console names it"
    )

    def __post_init__(self) -> None:
        if self.straggler_ratio <= 1:
            raise UserError(
                f"config key 'monitor.straggler_ratio' must be > 1, got {self.straggler_ratio}"
            )
        if self.straggler_intervals < 1:
            raise UserError(
                "config key 'monitor.straggler_intervals' must be >= 1, got "
                f"{self.straggler_intervals}"
            )


@dataclass
class ProfConfig:
    steps: str = _f(
        "", "START:END: a torch.profiler trace of these optimizer steps in <run dir>/profile/"
    )
    ranks: list[int] | None = _f(None, "the ranks that record the window (default: all)")
    memory_snapshot: bool = _f(
        False,
        "CUDA: record allocator history over the window (or the run) and write a snapshot for "
        "pytorch.org/memory_viz at its end and on out-of-memory",
    )
    top_ops: int = _f(15, "rows of the printed table of ops by self time")

    def __post_init__(self) -> None:
        if self.steps and self.window is None:
            raise UserError(
                f"prof.steps={self.steps!r} is not START:END with 1 <= START <= END "
                "(optimizer steps, e.g. prof.steps=20:25)"
            )

    @property
    def window(self) -> tuple[int, int] | None:
        """(first, last) optimizer step of the window; None when off or malformed."""
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.steps)
        if m is None or not 1 <= int(m[1]) <= int(m[2]):
            return None
        return int(m[1]), int(m[2])


@dataclass
class LogConfig:
    progress: Literal["auto", "bar", "lines", "off"] = _f(
        "auto", "console: auto = progress bar on a TTY, plain lines otherwise"
    )
    tensorboard: bool = _f(True, "TensorBoard event files under <run dir>/tb")
    tensorboard_graph: bool = _f(False, "TensorBoard: trace the model graph once, at start")
    wandb: WandbConfig = _section(WandbConfig, "Weights & Biases")


@dataclass
class Config:
    run: RunConfig = _section(RunConfig, "run identity and location")
    model: ModelConfig = _section(ModelConfig, "network")
    data: DataConfig = _section(DataConfig, "dataset and loading")
    optim: OptimConfig = _section(OptimConfig, "optimizer")
    sched: SchedConfig = _section(SchedConfig, "learning-rate schedule")
    train: TrainConfig = _section(TrainConfig, "loop")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "autocast dtype (fp16 needs CUDA)")
    dist: DistConfig = _section(DistConfig, "process group")
    strategy: StrategyConfig = _section(StrategyConfig, "how work is split across processes")
    ckpt: CkptConfig = _section(CkptConfig, "checkpoints and resume")
    log: LogConfig = _section(LogConfig, "console and trackers")
    monitor: MonitorConfig = _section(MonitorConfig, "per-rank timings and stragglers")
    prof: ProfConfig = _section(ProfConfig, "torch.profiler window")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


# --- conversion ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if typing.get_origin(tp) is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


_BOOL_WORDS = {False: ("off", "false", "no"), True: ("on", "true", "yes")}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` to `tp` or raise a one-line UserError naming the key and the type."""

    def bad() -> UserError:
        return UserError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")

    if isinstance(tp, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arm in typing.get_args(tp):
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key)
            except UserError:
                pass
        raise bad()
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads `off`/`on`/`no` as booleans
            spelled = [w for w in _BOOL_WORDS[value] if w in choices]
            value = spelled[0] if spelled else value
        if value not in choices:
            raise bad()
        return value
    if typing.get_origin(tp) is list:
        if isinstance(value, str):  # `key=a,b` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise bad()
        return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise bad()
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        try:  # YAML reads 1e3 as a string; accept it when it is whole
            as_float = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not as_float.is_integer():
            raise bad()
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _unknown_key(key: str, valid: list[str]) -> UserError:
    if key in MOVED:
        return UserError(f"config key {key!r} is now {MOVED[key]!r}")
    hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
    scope = key.rsplit(".", 1)[0] if "." in key else "the top level"
    return UserError(
        f"unknown config key {key!r}{maybe}; valid keys in {scope}: {', '.join(valid)}"
    )


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(key, names)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config key {key!r} is a section; set its keys as {key}.<key>")
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config key {'.'.join(parents[: i + 1])!r} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"override {text!r} is not key=value (e.g. optim.lr=0.1)")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def from_dict(values: dict[str, Any]) -> Config:
    return validate(_build(Config, values, ""))


def load(path: str | Path | Config | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (or a Config), then `key=value` overrides, checked at
    every level."""
    tree: dict[str, Any] = {}
    if isinstance(path, Config):
        tree = dataclasses.asdict(path)
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            reason = str(e).replace("\n", " ")
            raise UserError(f"config file {str(path)!r} is not valid YAML: {reason}") from None
        if not isinstance(tree, dict):
            raise UserError(f"config file {str(path)!r} must hold a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        if _declared_type(key) is str and not isinstance(value, str):
            # Names and paths keep the text typed: YAML reads `run.name=0123` as 83, `1.10` as
            # 1.1, `2024-01-01` as a date and `no` as False.
            value = text.partition("=")[2].strip()
        _set_dotted(tree, key, value)
    return from_dict(tree)


def _declared_type(dotted: str) -> Any:
    """The declared type of a dotted key, or None where it names no field."""
    tp: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


# URLs' user:password@, and storage_options entries whose names say they hold a
# secret (s3fs: key, secret, token; client_kwargs' aws_secret_access_key ...): never written to
# config.yaml, checkpoints or W&B.
_SECRET = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)


def _redacted(options: Any) -> Any:
    if not isinstance(options, dict):
        return options
    return {k: "<redacted>" if _SECRET.search(str(k)) else _redacted(v) for k, v in options.items()}


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as it is written down (secrets in the storage options redacted)."""
    tree = dataclasses.asdict(cfg)
    for section, url in (("data", "root"), ("ckpt", "remote")):
        tree[section]["storage_options"] = _redacted(tree[section]["storage_options"])
        tree[section][url] = storage.shown(tree[section][url])  # no user:password@
    return tree


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def validate(cfg: Config) -> Config:
    """Checks that span a single value's type: ranges and combinations."""
    positive = {
        "train.batch_size": cfg.train.batch_size,
        "train.accum_steps": cfg.train.accum_steps,
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "data.image_size": cfg.data.image_size,
        "ckpt.keep": cfg.ckpt.keep,
        "optim.base_batch": cfg.optim.base_batch,
        "dist.timeout_s": cfg.dist.timeout_s,
        "log.wandb.init_timeout_s": cfg.log.wandb.init_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key {key!r} must be > 0, got {value}")
    non_negative = {
        "train.epochs": cfg.train.epochs,
        "train.max_steps": cfg.train.max_steps,
        "data.workers": cfg.data.workers or 0,
        "sched.warmup_steps": cfg.sched.warmup_steps,
        "ckpt.every_steps": cfg.ckpt.every_steps,
        "train.global_batch": cfg.train.global_batch,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"config key {key!r} must be >= 0, got {value}")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise UserError("set train.epochs or train.max_steps above 0: the run has no steps")
    if cfg.model.num_classes is not None and cfg.model.num_classes < 2:
        raise UserError(f"model.num_classes must be >= 2, got {cfg.model.num_classes}")
    source = cfg.data.source
    if source not in BUILTIN_SOURCES and not is_import_path(source):
        raise UserError(
            f"data.source {source!r} is not one of {', '.join(BUILTIN_SOURCES[:-1])} "
            "or a pkg.module:callable"
        )
    if cfg.optim.head_lr_scale < 0:
        raise UserError(f"optim.head_lr_scale must be >= 0, got {cfg.optim.head_lr_scale}")
    _check_recipe(cfg)
    if len(cfg.optim.betas) != 2:
        raise UserError(f"optim.betas takes two numbers, got {cfg.optim.betas}")
    return cfg


def _check_recipe(cfg: Config) -> None:
    t = cfg.train
    for key, value in {
        "train.mixup_alpha": t.mixup_alpha,
        "train.cutmix_alpha": t.cutmix_alpha,
    }.items():
        if value < 0:
            raise UserError(f"config key {key!r} must be >= 0 (0: off), got {value}")
    for key, value in {"train.mix_prob": t.mix_prob, "train.mix_switch_prob": t.mix_switch_prob,
                       "train.label_smoothing": t.label_smoothing}.items():  # fmt: skip
        if not 0 <= value <= 1:
            raise UserError(f"config key {key!r} is a probability in [0, 1], got {value}")
    if not 0 <= t.ema_decay < 1:
        raise UserError(f"train.ema_decay must be in [0, 1) (0: off), got {t.ema_decay}")
    if t.ema_every < 1:
        raise UserError(f"train.ema_every must be >= 1, got {t.ema_every}")
    if cfg.ckpt.export_ema and not t.ema_decay:
        raise UserError("ckpt.export_ema=true needs an EMA: set train.ema_decay (e.g. 0.9998)")
    if cfg.ckpt.best_metric.endswith("_ema") and not t.ema_decay:
        raise UserError(
            f"ckpt.best_metric={cfg.ckpt.best_metric} needs an EMA: set train.ema_decay"
        )


def default_workers(local_world_size: int) -> int:
    """Loader workers per rank that the node's CPUs can feed: more only contend for them (torch
    warns at every epoch past the CPU count). A process bound to fewer CPUs than the node has
    (srun --cpus-per-task) already sees its own share."""
    node = os.cpu_count() or 1
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else node
    share = mine if mine < node else node // local_world_size
    return max(1, min(8, share))


def for_world(cfg: Config, world_size: int, local_world_size: int = 1) -> Config:
    """The config as this job runs it: batch_size derived from train.global_batch, and
    data.workers from the node's CPUs where unset. The run saves this resolved config."""
    t, d = cfg.train, cfg.data
    strays = [r for r in cfg.prof.ranks or () if not 0 <= r < world_size]
    if strays:
        raise UserError(
            f"prof.ranks={cfg.prof.ranks} names ranks {strays} of a job of {world_size} "
            f"processes; valid: 0..{world_size - 1}"
        )
    if d.workers is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, workers=default_workers(
            local_world_size)))  # fmt: skip
    if t.global_batch == 0:
        return cfg
    per_step = world_size * t.accum_steps
    if t.global_batch % per_step:
        raise UserError(
            f"train.global_batch={t.global_batch} is not divisible by world size {world_size} "
            f"× train.accum_steps {t.accum_steps}; use a multiple of {per_step}"
        )
    return dataclasses.replace(
        cfg, train=dataclasses.replace(t, batch_size=t.global_batch // per_step)
    )


def global_batch(cfg: Config, world_size: int) -> int:
    return cfg.train.batch_size * cfg.train.accum_steps * world_size


def help_rows(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf key, in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += help_rows(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}{f.name}", _type_name(tp), repr(default), f.metadata["help"]))
    return rows


def help_table() -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {t} | `{d}` | {h} |" for k, t, d, h in help_rows()]
    return "\n".join(lines)
