"""Model registry: a config's `model.name` maps to a factory `(num_classes, image_size) -> Module`.

Any torchvision classifier is also reachable as `tv:<name>` without registering it here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torchvision
from torch import nn
from torchvision import models as tvm

from distnn.errors import UserError
from distnn.models import cifar

Factory = Callable[[int, int], nn.Module]
F = TypeVar("F", bound=Factory)

TV_PREFIX = "tv:"
# Images up to this size get CIFAR-style networks: the ImageNet stems downsample 4-32x before the
# first block, which leaves almost nothing of a small image to classify.
SMALL_IMAGE_MAX = 64

_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[F], F]:
    """Decorator adding `factory(num_classes, image_size) -> nn.Module` to the zoo as `name`."""
    if not name or name.startswith(TV_PREFIX):
        raise ValueError(f"invalid model name {name!r}: empty or shadows the {TV_PREFIX} family")

    def decorator(factory: F) -> F:
        # Registering twice is a programming error (two modules claiming one name), not user input.
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def names() -> list[str]:
    """Sorted registered model names (the open-ended `tv:<name>` family is not listed)."""
    return sorted(_REGISTRY)


def torchvision_names() -> list[str]:
    """Sorted torchvision classification models usable as `tv:<name>`."""
    # module= restricts the list to classifiers (no detection/segmentation/video models).
    return sorted(tvm.list_models(module=torchvision.models))


def build(name: str, num_classes: int, image_size: int) -> nn.Module:
    """Build a freshly initialised (never pretrained) model; bad input raises UserError."""
    _require_positive_int("model.num_classes", num_classes)
    _require_positive_int("image_size", image_size)
    if name.startswith(TV_PREFIX):
        return _build_torchvision(name, num_classes)
    factory = _REGISTRY.get(name)
    if factory is None:
        raise UserError(
            f"unknown model.name {name!r}; valid: {', '.join(names())}, "
            f"or {TV_PREFIX}<torchvision classifier>"
        )
    return factory(num_classes, image_size)


def _build_torchvision(name: str, num_classes: int) -> nn.Module:
    tv_name = name[len(TV_PREFIX) :]
    available = torchvision_names()
    if tv_name not in available:
        examples = ", ".join(TV_PREFIX + n for n in available[:10])
        raise UserError(
            f"unknown model.name {name!r}: {tv_name!r} is not a torchvision classifier; "
            f"e.g. {examples}, ..."
        )
    return tvm.get_model(tv_name, weights=None, num_classes=num_classes)


def _require_positive_int(field: str, value: object) -> None:
    # bool is an int subclass; `num_classes: true` in YAML should not build a 1-class model.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{field} must be a positive integer, got {value!r}")


def _require_min_size(model: str, image_size: int, minimum: int) -> None:
    # Each maxpool halves the map; below the minimum one of them would produce a 0x0 tensor and
    # fail deep inside forward() with an unhelpful shape error.
    if image_size < minimum:
        raise UserError(f"model {model} needs image_size >= {minimum}, got {image_size}")


@register("tutorial_cnn")
def tutorial_cnn(num_classes: int, image_size: int) -> nn.Module:
    _require_min_size("tutorial_cnn", image_size, 8)
    return cifar.TutorialCNN(num_classes, image_size)


@register("lenet5")
def lenet5(num_classes: int, image_size: int) -> nn.Module:
    _require_min_size("lenet5", image_size, 16)
    return cifar.LeNet5(num_classes)


@register("alexnet_cifar")
def alexnet_cifar(num_classes: int, image_size: int) -> nn.Module:
    if image_size > SMALL_IMAGE_MAX:
        return tvm.alexnet(weights=None, num_classes=num_classes)
    _require_min_size("alexnet_cifar", image_size, 8)
    return cifar.AlexNetCifar(num_classes)


def _vgg(name: str, cfg: str, imagenet: Callable[..., nn.Module]) -> Factory:
    def factory(num_classes: int, image_size: int) -> nn.Module:
        if image_size > SMALL_IMAGE_MAX:
            return imagenet(weights=None, num_classes=num_classes)
        _require_min_size(name, image_size, 32)
        return cifar.VGGCifar(cifar.VGG_CFGS[cfg], num_classes)

    return factory


def _resnet(imagenet: Callable[..., tvm.ResNet]) -> Factory:
    def factory(num_classes: int, image_size: int) -> nn.Module:
        model = imagenet(weights=None, num_classes=num_classes)
        return cifar.cifar_stem(model) if image_size <= SMALL_IMAGE_MAX else model

    return factory


register("vgg11_bn")(_vgg("vgg11_bn", "A", tvm.vgg11_bn))
register("vgg16_bn")(_vgg("vgg16_bn", "D", tvm.vgg16_bn))
register("resnet18")(_resnet(tvm.resnet18))
register("resnet50")(_resnet(tvm.resnet50))
