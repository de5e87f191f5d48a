"""Build a model without holding it: record its construction on the meta device, replay it
one tensor at a time once the model is sharded.

A sharded run must hold no whole model on any rank, yet start from exactly the weights an eager
build gives: the same draws from the same seeded RNG stream, in the same order. So the build
runs on the meta device under a dispatch mode that records every aten op it issues (layer
constructors, the model's own init loops, `model.init`, copies of pretrained weights). After the
strategy has sharded the meta model and allocated its shards, the log is replayed on the CPU in
order (every random op draws exactly what it drew eagerly), but each storage lives only from the
op that writes it whole to its last use: an init that a later init overwrites is computed and
dropped at once, and a parameter's final value goes into this rank's shard and is dropped. At
any time a rank holds a few full tensors, not the model.

Where a build cannot run on meta (it reads a value: `.item()`, `.tolist()`, numpy), or leaves
tensors outside its parameters and buffers, `record` raises Unsupported: the caller builds
eagerly and says so.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
META, CPU = torch.device("meta"), torch.device("cpu")

# In-place ops whose result does not depend on the tensor's previous value: when they cover a
# whole storage, the value before them is dead.
OVERWRITE = {
    aten.fill_, aten.zero_, aten.copy_, aten.uniform_, aten.normal_, aten.random_,
    aten.bernoulli_, aten.exponential_, aten.cauchy_, aten.log_normal_, aten.geometric_,
}  # fmt: skip


# torch's inits that draw until a condition holds (trunc_normal_ rejects samples) or compute
# from values (orthogonal_'s QR) return meta tensors untouched. While recording they become
# one op each, replayed by calling them on the real tensor. trunc_normal_ is caught through
# the helper every caller reaches, however it imported trunc_normal_.
VALUE_INITS = ("_no_grad_trunc_normal_", "orthogonal_", "dirac_", "sparse_")
INITS = {getattr(nn.init, name) for name in VALUE_INITS}


class Unsupported(Exception):
    """The model cannot be built on the meta device; the message says why."""


@dataclass(frozen=True)
class Ref:
    """A tensor of the build, by its storage and its view of that storage."""

    key: int
    nbytes: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    whole: bool  # covers its whole storage densely: an overwrite of it replaces the storage


@dataclass(frozen=True)
class Const:
    """A real tensor the build read but did not make (pretrained weights, a lookup table)."""

    tensor: torch.Tensor


class Op(NamedTuple):
    func: Any
    args: Any
    kwargs: Any
    out: Any


def _key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except Exception as e:  # tensor subclasses without a storage
        raise Unsupported(f"it makes a {type(t).__name__} without a storage") from e


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        # Every tensor seen stays alive while recording: a storage's id then names one storage.
        self.seen: list[torch.Tensor] = []
        self.made: set[int] = set()

    def ref(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return CPU if x == META else x
        self.seen.append(x)
        if not x.is_meta and _key(x) not in self.made:
            return Const(x)
        return _ref(x)

    @contextlib.contextmanager
    def inits(self) -> Iterator[None]:
        """nn.init's value-dependent inits recorded as calls on meta tensors."""

        def recorded(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                if tensor.is_meta:
                    ref = self.ref(tensor)
                    self.ops.append(Op(fn, (ref, *args), kwargs, ref))
                    return tensor
                return fn(tensor, *args, **kwargs)

            return call

        originals = {name: getattr(nn.init, name) for name in VALUE_INITS}
        try:
            for name, fn in originals.items():
                setattr(nn.init, name, recorded(fn))
            yield
        finally:
            for name, fn in originals.items():
                setattr(nn.init, name, fn)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].is_meta:
            raise Unsupported("it reads a tensor's value while building (.item(), .tolist())")
        inputs = (tree_map(self.ref, args), tree_map(self.ref, kwargs))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.made.add(_key(t))
        self.ops.append(Op(func, *inputs, tree_map(self.ref, out)))
        return out


def _ref(t: torch.Tensor) -> Ref:
    nbytes = t.untyped_storage().nbytes()
    whole = t.storage_offset() == 0 and t.numel() * t.element_size() == nbytes and _dense(t)
    return Ref(_key(t), nbytes, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype,
               whole)  # fmt: skip


def _dense(t: torch.Tensor) -> bool:
    """No two elements share memory and none is skipped (in some order of the dims)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _refs(*trees: Any) -> Iterator[Ref]:
    for tree in trees:
        yield from (x for x in tree_flatten(tree)[0] if isinstance(x, Ref))


def _overwritten(op: Op) -> Ref | None:
    first = op.args[0] if op.args else None
    func = getattr(op.func, "overloadpacket", op.func)  # an aten overload, or an nn.init call
    if (func in OVERWRITE or func in INITS) and isinstance(first, Ref) and first.whole:
        return first
    return None


@dataclass
class Stats:
    peak_bytes: int  # the most bytes of full tensors held at once while replaying
    model_bytes: int  # the whole model's parameters and buffers

    def describe(self) -> str:
        mb = 2**20
        return (
            f"built on the meta device, initialised shard by shard: at most "
            f"{self.peak_bytes / mb:.1f} MB of full tensors at once (the model is "
            f"{self.model_bytes / mb:.1f} MB)"
        )


class Recipe:
    """The recorded build of one model: `materialize` replays it into the model's shards."""

    def __init__(self, ops: list[Op], model: nn.Module, rng: torch.Tensor) -> None:
        self.ops, self.rng = ops, rng
        self.state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.finals = {name: _ref(t) for name, t in self.state.items()}
        self.ends = self._plan()

    def _plan(self) -> dict[int, list[tuple[int, bool]]]:
        """After which op each storage's value dies, and whether it is the model's final one."""
        last: dict[int, int] = {}
        ends: dict[int, list[tuple[int, bool]]] = defaultdict(list)
        known: set[int] = set()
        for i, op in enumerate(self.ops):
            over = _overwritten(op)
            if over is not None:
                if over.key in last:
                    ends[last.pop(over.key)].append((over.key, False))
                known.add(over.key)
            for r in _refs(op.args, op.kwargs):
                if r.key not in known:
                    raise Unsupported(f"its {op.func} reads a meta tensor made outside the build")
            for r in _refs(op.args, op.kwargs, op.out):
                known.add(r.key)
                last[r.key] = i
        wanted = {r.key for r in self.finals.values()}
        for key, i in last.items():
            ends[i].append((key, key in wanted))
        return ends

    def materialize(self, model: nn.Module) -> Stats:
        """Fill `model` (sharded, allocated with to_empty) with the build's values: parameters
        into their local shards, buffers whole."""
        targets: dict[int, list[tuple[Ref, torch.Tensor]]] = defaultdict(list)
        live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, ref in self.finals.items():
            targets[ref.key].append((ref, live[name]))
        real: dict[int, torch.UntypedStorage] = {}

        def tensor(x: Any) -> Any:
            if isinstance(x, Const):
                return x.tensor
            if not isinstance(x, Ref):
                return x
            return torch.empty(0, dtype=x.dtype).set_(real[x.key], x.offset, x.size, x.stride)

        peak = 0
        # The replay draws what the build drew eagerly: from the RNG state the build began at.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            for i, op in enumerate(self.ops):
                over = _overwritten(op)
                if over is not None:
                    real[over.key] = torch.empty(over.nbytes, dtype=torch.uint8).untyped_storage()
                out = op.func(*tree_map(tensor, op.args), **tree_map(tensor, op.kwargs))
                for ref, t in zip(tree_flatten(op.out)[0], tree_flatten(out)[0], strict=True):
                    if isinstance(ref, Ref) and ref.key not in real:
                        real[ref.key] = t.untyped_storage()
                del out
                peak = max(peak, sum(s.nbytes() for s in real.values()))
                for key, final in self.ends.get(i, ()):
                    for ref, dest in targets[key] if final else ():
                        _place(tensor(ref), dest)
                    real.pop(key, None)
        model_bytes = sum(t.numel() * t.element_size() for t in self.state.values())
        return Stats(peak, model_bytes)


def _place(full: torch.Tensor, dest: torch.Tensor) -> None:
    """This rank's part of `full` into `dest` (a DTensor's local shard, or a whole tensor)."""
    if hasattr(dest, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            full.shape, dest.device_mesh, dest.placements
        )
        part = full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
        dest.to_local().copy_(part)
    else:
        dest.copy_(full)


_RECIPES: weakref.WeakKeyDictionary[nn.Module, Recipe] = weakref.WeakKeyDictionary()


def record(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` on the meta device, its ops recorded: the returned model holds no memory and
    `recipe(model)` can fill it later. Raises Unsupported where that cannot be exact."""
    recorder = _Recorder()
    rng = torch.get_rng_state()
    # Ops on real tensors inside the build may draw; the replay draws them again.
    with torch.random.fork_rng(devices=[]), torch.device(META), recorder, recorder.inits():
        model = build()
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise Unsupported(f"{name or 'the model'} holds tensor {attr!r} outside its "
                                  "parameters and buffers")  # fmt: skip
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]
    if real:
        raise Unsupported(f"it places {real[0]} on a device of its own")
    _RECIPES[model] = Recipe(recorder.ops, model, rng)
    return model


def recipe(model: nn.Module) -> Recipe | None:
    """The recorded build of `model` where `record` made it."""
    return _RECIPES.get(model)
