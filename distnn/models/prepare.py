"""`prepare`: the model a run starts from — built, initialised, loaded, frozen, on its device.

Every rank calls it after the same seed, so every rank holds identical weights before any
process group forms; everything that can be wrong with the model is one line by then.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distnn.config import Config
from distnn.errors import UserError, reason
from distnn.models import deferred, factory, grad_checkpoint, init, pretrained, summary

ModelArg = nn.Module | Callable[..., nn.Module] | None


def head(model: nn.Module, num_classes: int, name: str = "") -> str:
    """The classifier's module name: `name` where given, timm's own record, else the last
    Linear or 1×1 conv with num_classes outputs ("" when there is none)."""
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            top = ", ".join(n for n in modules if n and "." not in n)
            raise UserError(f"model.head={name!r} is not a module of this model; top level: {top}")
        return name
    recorded = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(recorded, str) and recorded in modules:
        return recorded
    outputs = [
        n
        for n, m in modules.items()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1))
    ]
    return outputs[-1] if outputs else ""


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """requires_grad=False for parameters under any prefix; the number of tensors frozen."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise UserError(
                f"model.freeze={prefix!r} matches no parameter; top-level names: {', '.join(top)}"
            )
    frozen = 0
    for n, p in model.named_parameters():
        if any(n == pre or n.startswith(pre + ".") for pre in prefixes):
            p.requires_grad_(False)
            frozen += 1
    if frozen == len(names):
        raise UserError(f"model.freeze={','.join(prefixes)} leaves no parameter to train")
    return frozen


def _build(cfg: Config, num_classes: int, given: ModelArg) -> nn.Module:
    if given is None:
        return factory.build(cfg.model.name, num_classes, cfg.data.image_size, cfg.model.kwargs)
    if isinstance(given, nn.Module):
        return given
    return factory.from_callable(
        given, cfg.model.name, num_classes, cfg.data.image_size, cfg.model.kwargs
    )


def _initialised(
    cfg: Config, num_classes: int, given: ModelArg, fresh: bool
) -> tuple[nn.Module, str, list[str]]:
    model = _build(cfg, num_classes, given)
    init.initialize(model, cfg.model.init)
    classifier = head(model, num_classes, cfg.model.head)
    notes = []
    if cfg.model.init_from and fresh:
        weights = pretrained.read(cfg.model.init_from, cfg.model.init_from_trusted)
        kept = pretrained.load(model, weights, classifier, cfg.model.init_from)
        fresh_keys = f"; new (not loaded): {', '.join(kept)}" if kept else ""
        notes.append(f"weights from {cfg.model.init_from}{fresh_keys}")
    return model, classifier, notes


def _on_meta(
    cfg: Config, num_classes: int, given: ModelArg, fresh: bool
) -> tuple[nn.Module, str, list[str]] | str:
    """The model built on the meta device (models/deferred.py), or why it cannot be."""
    made: list[tuple[str, list[str]]] = []

    def build() -> nn.Module:  # no channels_last: FSDP, the one meta-init strategy, refuses it
        model, classifier, notes = _initialised(cfg, num_classes, given, fresh)
        made.append((classifier, notes))
        return model

    try:
        model = deferred.record(build)
    except deferred.Unsupported as e:
        return str(e)
    except Exception as e:  # something meta tensors cannot do (numpy, a copy out), or a real
        return reason(e)  # error, which the eager build then raises
    return model, *made[0]


def prepare(
    cfg: Config,
    num_classes: int,
    device: torch.device,
    given: ModelArg = None,
    fresh: bool = True,
    meta_init: bool = False,
) -> tuple[nn.Module, str, list[str]]:
    """(model, its head's name, lines for the run log). `fresh`: a new run, which loads
    `model.init_from`; a resumed one takes its weights from its checkpoint instead.
    `meta_init`: build on the meta device for a strategy that fills its shards from the
    recorded build (a model object that is already built cannot be)."""
    built = None
    if meta_init and not isinstance(given, nn.Module):
        built = _on_meta(cfg, num_classes, given, fresh)
    on_meta = isinstance(built, tuple)
    model, classifier, notes = built if on_meta else _initialised(cfg, num_classes, given, fresh)
    if isinstance(built, str):
        notes.append(f"model {cfg.model.name} cannot be built on the meta device ({built}): "
                     "every rank builds it whole, then shards it")  # fmt: skip
    if cfg.model.grad_checkpointing:  # before any strategy wraps or shards the blocks
        notes.append(grad_checkpoint.apply(model, cfg.strategy.fsdp.blocks))
    if cfg.model.freeze:
        frozen = freeze(model, cfg.model.freeze)
        notes.append(f"frozen: {frozen} parameter tensors under {', '.join(cfg.model.freeze)}")
    if not on_meta:
        model = model.to(device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
    where = deferred.META if on_meta else device
    profile = summary.profile(model, cfg.data.image_size, num_classes, where)
    notes.insert(0, f"model {cfg.model.name}: {profile.describe()}")
    return model, classifier, notes
