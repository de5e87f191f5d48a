"""Model zoo: every model trains a step, shapes match references, bad names are UserErrors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from distnn import checkpoint
from distnn.errors import UserError
from distnn.models import build, cifar, names, register, zoo
from tests.conftest import one_line_error

EXPECTED_NAMES = [
    "alexnet_cifar",
    "lenet5",
    "resnet18",
    "resnet50",
    "tutorial_cnn",
    "vgg11_bn",
    "vgg16_bn",
]


def train_step(model: nn.Module, image_size: int, num_classes: int, batch: int = 2) -> torch.Tensor:
    """One forward/backward in train mode; asserts every trainable parameter got a finite grad."""
    torch.manual_seed(0)
    model.train()
    x = torch.randn(batch, 3, image_size, image_size)
    target = torch.randint(0, num_classes, (batch,))
    out = model(x)
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, target).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without grad: {missing}"
    bad = [
        n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
    ]
    assert not bad, f"non-finite grads: {bad}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)
    return out


def test_names_are_sorted_and_complete() -> None:
    # Guards the parametrized test below against silently running over an empty registry.
    assert names() == EXPECTED_NAMES


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_model_trains_at_32px(name: str) -> None:
    torch.manual_seed(0)
    train_step(build(name, num_classes=7, image_size=32), image_size=32, num_classes=7)


@pytest.mark.parametrize(
    ("name", "imagenet_type"),
    [
        ("resnet18", tvm.ResNet),
        ("resnet50", tvm.ResNet),
        ("vgg11_bn", tvm.VGG),
        ("alexnet_cifar", tvm.AlexNet),
        ("tv:mobilenet_v3_small", tvm.MobileNetV3),
    ],
)
def test_imagenet_sized_models_train_at_224px(name: str, imagenet_type: type) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=7, image_size=224)
    assert isinstance(model, imagenet_type)
    train_step(model, image_size=224, num_classes=7)


@pytest.mark.parametrize("name", ["vgg11_bn", "vgg16_bn"])
def test_vgg_is_the_cifar_variant_up_to_64px(name: str) -> None:
    # The >64 px side is covered by the 224 px test; building a 138M-parameter VGG16 costs seconds.
    model = build(name, 10, 64)
    assert isinstance(model, cifar.VGGCifar)
    train_step(model, image_size=64, num_classes=10)


def test_small_image_threshold_is_64px() -> None:
    assert isinstance(build("alexnet_cifar", 10, 64), cifar.AlexNetCifar)
    assert isinstance(build("alexnet_cifar", 10, 65), tvm.AlexNet)
    assert build("resnet18", 10, 64).conv1.kernel_size == (3, 3)
    assert build("resnet18", 10, 65).conv1.kernel_size == (7, 7)


def test_tutorial_cnn_has_the_tutorial_layer_shapes() -> None:
    model = build("tutorial_cnn", num_classes=10, image_size=32)
    convs = [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m.weight.shape for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs == [(32, 3, 5, 5), (32, 32, 5, 5), (64, 32, 5, 5)]
    assert linears == [(64, 1024), (10, 64)]
    by_hand = (
        (3 * 25 * 32 + 32)
        + (32 * 25 * 32 + 32)
        + (32 * 25 * 64 + 64)
        + (1024 * 64 + 64)
        + (64 * 10 + 10)
    )
    assert by_hand == 145_578
    assert sum(p.numel() for p in model.parameters()) == by_hand


def test_tutorial_cnn_pool_is_identity_at_32px_only() -> None:
    at_32 = build("tutorial_cnn", 10, 32)
    at_64 = build("tutorial_cnn", 10, 64)
    assert isinstance(at_32.pool, nn.Identity)
    assert isinstance(at_64.pool, nn.AdaptiveAvgPool2d)
    # Same parameter names at every size, so checkpoints move between image sizes.
    assert at_32.state_dict().keys() == at_64.state_dict().keys()
    for size in (8, 48, 100):
        train_step(build("tutorial_cnn", 3, size), image_size=size, num_classes=3)


def test_lenet5_works_at_other_sizes() -> None:
    for size in (16, 28, 96):
        train_step(build("lenet5", 4, size), image_size=size, num_classes=4)


def test_build_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(123)
    a = build("tutorial_cnn", 10, 32)
    torch.manual_seed(123)
    b = build("tutorial_cnn", 10, 32)
    torch.manual_seed(124)
    c = build("tutorial_cnn", 10, 32)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_resnet18_stem_depends_on_image_size() -> None:
    small = build("resnet18", 10, 32)
    assert small.conv1.kernel_size == (3, 3)
    assert small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = build("resnet18", 10, 224)
    assert large.conv1.kernel_size == (7, 7)
    assert large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)


def test_unknown_name_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError) as exc:
        build("resnet19", 10, 32)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "'resnet19'" in msg
    assert "resnet18" in msg and "tutorial_cnn" in msg and "tv:" in msg


def test_name_with_newline_still_gives_one_line() -> None:
    with pytest.raises(UserError) as exc:
        build("res\nnet", 10, 32)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("bad", ["tv:resnet19", "tv:fasterrcnn_resnet50_fpn", "tv:"])
def test_unknown_torchvision_name_is_a_one_line_user_error(bad: str) -> None:
    # fasterrcnn is a real torchvision model but a detector, so it must be rejected too.
    with pytest.raises(UserError) as exc:
        build(bad, 10, 224)
    msg = str(exc.value)
    assert "\n" not in msg
    assert repr(bad) in msg
    assert "not a torchvision classifier" in msg
    assert "closest:" in msg


def test_torchvision_passthrough_uses_num_classes() -> None:
    torch.manual_seed(0)
    model = build("tv:resnet18", num_classes=5, image_size=32)
    assert isinstance(model, tvm.ResNet)
    # tv: models are taken as-is: no CIFAR stem even at 32 px.
    assert model.conv1.kernel_size == (7, 7)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize(
    ("num_classes", "image_size"), [(0, 32), (10, 0), (True, 32), (10, 32.0), ("10", 32)]
)
def test_bad_sizes_are_user_errors(num_classes: object, image_size: object) -> None:
    with pytest.raises(UserError):
        build("tutorial_cnn", num_classes, image_size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "too_small"), [("tutorial_cnn", 7), ("lenet5", 15), ("vgg11_bn", 31)]
)
def test_too_small_images_are_user_errors(name: str, too_small: int) -> None:
    with pytest.raises(UserError, match=f"needs image_size >= {too_small + 1}"):
        build(name, 10, too_small)


def test_register_adds_a_factory_and_rejects_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))

    @register("tiny")
    def tiny(num_classes: int, image_size: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, num_classes))

    assert "tiny" in names()
    train_step(build("tiny", 3, 8), image_size=8, num_classes=3)
    with pytest.raises(ValueError, match="already registered"):
        register("tiny")(tiny)
    with pytest.raises(ValueError):
        register("tv:resnet18")


@pytest.mark.timeout(120)
def test_timm_model_trains_a_few_steps_at_32px(make_cfg) -> None:
    from distnn.train import train

    cfg = make_cfg("run.name=timm", "model.name=timm:resnet18", "model.kwargs.drop_rate=0.1",
                   "train.max_steps=3", "train.batch_size=8", "data.synthetic_train=64",
                   "data.synthetic_val=16", "log.tensorboard=false")  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["train_loss"] == summary["train_loss"]
    state = checkpoint.load_file(cfg.run_dir)
    assert state["config"]["model"]["kwargs"] == {"drop_rate": 0.1}
    assert state["strategy"]["model"]["fc.weight"].shape == (10, 512)


def test_unknown_timm_name_is_one_line_with_suggestions(tmp_path, capfd) -> None:
    from distnn.train import main

    argv = [f"run.dir={tmp_path}", "model.name=timm:resnet_18", "log.wandb.mode=disabled"]
    line = one_line_error(main, argv, capfd)
    assert line.startswith("error: unknown model.name 'timm:resnet_18': not a timm model; closest:")
    assert "resnet18" in line.split("closest:")[1]


def test_model_kwargs_reach_the_builder_and_bad_ones_are_one_line() -> None:
    model = build("tv:resnet18", 5, 32, {"zero_init_residual": True})
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0
    with pytest.raises(UserError, match=r"model.name='tv:resnet18': building it raised TypeError"):
        build("tv:resnet18", 5, 32, {"depth": 4})
    with pytest.raises(UserError, match=r"zoo model 'resnet18' takes no model\.kwargs"):
        build("resnet18", 5, 32, {"depth": 4})
    with pytest.raises(UserError, match=r"model\.kwargs may not set num_classes"):
        build("tv:resnet18", 5, 32, {"num_classes": 3})
