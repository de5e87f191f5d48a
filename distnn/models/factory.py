"""`build(name, num_classes, image_size, kwargs)`: every family of model names, one registry.

resnet18                the zoo (models/zoo.py)
tv:efficientnet_b0      any torchvision classifier
timm:convnext_atto      any timm classifier (never downloads weights)
mypkg.nets:MyNet        any importable callable returning an nn.Module
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn
from torchvision import models as tvm

from distnn import imports
from distnn.errors import UserError, reason
from distnn.models import deferred, zoo

KEY = "model.name"
# The name a run records for a model handed to distnn.fit as a Python object.
PYTHON = "python"
RESERVED = ("num_classes", "image_size")


def _zoo(name: str, num_classes: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    factory = zoo.get(name)
    if factory is None:
        raise UserError(
            f"unknown {KEY} {name!r}; valid: {', '.join(zoo.names())}, tv:<torchvision name>, "
            "timm:<timm name> or pkg.module:callable"
        )
    if kwargs:
        raise UserError(f"zoo model {name!r} takes no model.kwargs, got {sorted(kwargs)}")
    return factory(num_classes, image_size)


def torchvision_names() -> list[str]:
    """Sorted torchvision classification models usable as `tv:<name>`."""
    # module= restricts the list to classifiers (no detection/segmentation/video models).
    return sorted(tvm.list_models(module=torchvision.models))


def _torchvision(name: str, num_classes: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    available = torchvision_names()
    if name not in available:
        raise UserError(
            f"unknown {KEY} 'tv:{name}': not a torchvision classifier; "
            f"closest: {_closest(name, available)}"
        )
    return _call(tvm.get_model, f"tv:{name}", name, weights=None, num_classes=num_classes, **kwargs)


# timm.create_model keywords that make it read a file.
_TIMM_FILES = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"}


def _timm(name: str, num_classes: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm  # 3 s to import: only runs that use it pay

    if not timm.is_model(name):
        raise UserError(
            f"unknown {KEY} 'timm:{name}': not a timm model; closest: "
            f"{_closest(name, timm.list_models())}"
        )
    reads = sorted(set(kwargs) & _TIMM_FILES)
    if reads:  # timm would unpickle the file whole: a door around safeload
        raise UserError(
            f"model.kwargs.{reads[0]}: timm would load a file with it; give the weights "
            "as model.init_from= instead"
        )
    return _call(timm.create_model, f"timm:{name}", name, pretrained=False,
                 num_classes=num_classes, **kwargs)  # fmt: skip


def _python(name: str, num_classes: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    raise UserError(
        f"{KEY}='{PYTHON}:{name}' was a model object handed to distnn.fit; pass it again "
        "(distnn.fit(model=...), Predictor(..., model=...)) or name a pkg.module:callable"
    )


FAMILIES: dict[str, Callable[[str, int, int, dict[str, Any]], nn.Module]] = {
    "tv": _torchvision,
    "timm": _timm,
    PYTHON: _python,
}


def build(
    name: str, num_classes: int, image_size: int, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A freshly initialised (never pretrained) model; bad input raises UserError."""
    _require_positive_int("model.num_classes", num_classes)
    _require_positive_int("image_size", image_size)
    kwargs = dict(kwargs or {})
    clash = [k for k in RESERVED if k in kwargs]
    if clash:
        raise UserError(f"model.kwargs may not set {clash[0]}: distnn passes it from the data")
    family, sep, rest = name.partition(":")
    if not sep:
        return _zoo(name, num_classes, image_size, kwargs)
    if family in FAMILIES:
        return FAMILIES[family](rest, num_classes, image_size, kwargs)
    return from_callable(imports.resolve(name, KEY), name, num_classes, image_size, kwargs)


def build_named(
    name: str, num_classes: int, image_size: int, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """The model a file names (a checkpoint's or an export's config): a file is data, so only
    the names distnn builds itself (zoo, tv:, timm:) are built; an import path found in it is
    never imported."""
    family, sep, _ = name.partition(":")
    if sep and family not in FAMILIES:
        raise UserError(
            f"the checkpoint names {KEY}={name!r}, an import path: distnn never imports a name "
            f"found in a file; if you trust it, name it yourself (predict --model {name}, "
            "Predictor(model=...))"
        )
    return build(name, num_classes, image_size, kwargs)


def from_callable(
    fn: Callable[..., Any], name: str, num_classes: int, image_size: int, kwargs: dict[str, Any]
) -> nn.Module:
    """fn(num_classes=, image_size= where it names them, **kwargs) -> the user's module."""
    offered = {"num_classes": num_classes, "image_size": image_size}
    passed = imports.accepted(fn, offered)
    if "num_classes" not in passed and _takes_var_keyword(fn):
        passed["num_classes"] = num_classes  # timm-style **kwargs builders take it
    model = _call(fn, name, **passed, **kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"{KEY}={name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _call(fn: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (UserError, deferred.Unsupported):  # the latter: models/prepare.py builds eagerly
        raise
    except Exception as e:  # the builder is the user's code, or takes the user's kwargs
        raise UserError(f"{KEY}={name!r}: building it raised {reason(e)}") from None


def _takes_var_keyword(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _closest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    return ", ".join(close) if close else f"none near it among {len(candidates)} names"


def _require_positive_int(field: str, value: object) -> None:
    # bool is an int subclass; `num_classes: true` in YAML should not build a 1-class model.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{field} must be a positive integer, got {value!r}")
