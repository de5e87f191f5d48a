"""The zoo: registered names, each a factory `(num_classes, image_size) -> Module`.

Other families (`tv:`, `timm:`, `pkg.module:callable`) are built in models/factory.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn
from torchvision import models as tvm

from distnn.errors import UserError
from distnn.models import cifar

Factory = Callable[[int, int], nn.Module]
F = TypeVar("F", bound=Factory)

# Images up to this size get CIFAR-style networks: the ImageNet stems downsample 4-32x before the
# first block, which leaves almost nothing of a small image to classify.
SMALL_IMAGE_MAX = 64

_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[F], F]:
    """Decorator adding `factory(num_classes, image_size) -> nn.Module` to the zoo as `name`."""
    if not name or ":" in name:
        raise ValueError(f"invalid model name {name!r}: empty or shadows a name:<...> family")

    def decorator(factory: F) -> F:
        # Registering twice is a programming error (two modules claiming one name), not user input.
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def names() -> list[str]:
    """Sorted registered model names (the open-ended families are not listed)."""
    return sorted(_REGISTRY)


def get(name: str) -> Factory | None:
    return _REGISTRY.get(name)


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
