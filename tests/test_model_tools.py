"""Model tools: `python -m distnn.models summary`, profile() and the model.init schemes."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from distnn import config
from distnn.errors import UserError
from distnn.models import build, names
from distnn.models.__main__ import main
from distnn.models.init import SCHEMES, expected_std, initialize
from distnn.models.summary import Profile, profile, table
from tests.conftest import importable, run_cli

CPU = torch.device("cpu")

TINYNET = """from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
"""


def total_params(output: str) -> int:
    match = re.search(r"^Total params: ([\d,]+)$", output, re.MULTILINE)
    assert match, output
    return int(match[1].replace(",", ""))


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def userpkg_dir(tmp_path_factory) -> Path:
    """A user's package, `userpkg.nets`, in a directory of its own."""
    root = tmp_path_factory.mktemp("user")
    (root / "userpkg").mkdir()
    (root / "userpkg" / "__init__.py").write_text("")
    (root / "userpkg" / "nets.py").write_text(TINYNET)
    return root


@pytest.fixture
def userpkg(userpkg_dir):
    """userpkg importable in this process for the test's duration."""
    with importable(userpkg_dir, "userpkg"):
        yield


# --- summary CLI --------------------------------------------------------------------------------


def summary(capsys, *args: str) -> str:
    """`python -m distnn.models summary ...` in this process: its stdout."""
    main(["summary", *args])
    return capsys.readouterr().out


@pytest.mark.parametrize("name, kwargs", [("resnet18", {}), ("timm:test_vit", {"img_size": 32})])
def test_summary_total_params_match_the_model(capsys, name, kwargs):
    # A ViT: its cls token and position embeddings belong to no leaf layer.
    extra = ["--kwargs", *(f"{k}={v}" for k, v in kwargs.items())] if kwargs else []
    out = summary(capsys, name, "--image-size", "32", *extra)
    assert total_params(out) == count(build(name, 10, 32, kwargs))
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"\S+ \w? ?parameters \(.+ trainable\), .+FLOPs per image", last), last
    assert "Units." not in out  # torchinfo's enum label, rewritten


def test_summary_of_a_users_model(capsys, userpkg):
    out = summary(capsys, "userpkg.nets:TinyNet", "--kwargs", "width=4")
    model = build("userpkg.nets:TinyNet", 10, 32, {"width": 4})
    assert total_params(out) == count(model)
    assert count(model) != count(build("userpkg.nets:TinyNet", 10, 32))  # the kwarg reached it


def test_summary_of_an_unknown_model_is_one_error_line():
    """The CLI as a user starts it: exit code 2, one line."""
    result = run_cli("-m", "distnn.models", "summary", "no_such")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "no_such" in lines[0]


@pytest.mark.parametrize("argv", [[], ["list"]])
def test_list(argv, capsys):
    main(argv)
    out = capsys.readouterr().out.splitlines()
    assert out[: len(names())] == names()
    for family in ("tv:<name>", "timm:<name>", "pkg.module:callable"):
        assert any(line.startswith(family) for line in out), family


def test_bad_kwargs_are_a_user_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["summary", "tutorial_cnn", "--kwargs", "width"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: --kwargs takes key=value, got 'width'\n"


# --- profile and table ---------------------------------------------------------------------------


class Noisy(nn.Module):
    """Draws from the global RNG even in eval mode, as some augmenting models do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0 * torch.randn_like(x)


def bn_net(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        Noisy(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes),
    )  # fmt: skip


def test_profile_counts_parameters():
    model = bn_net()
    model[1].weight.requires_grad_(False)
    p = profile(model, 8, 10, CPU)
    assert p.params == count(model)
    assert p.trainable == count(model) - model[1].weight.numel()


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)),
        nn.Sequential(nn.Conv2d(3, 10, kernel_size=4), nn.Flatten()),  # one output position
    ],
    ids=["linear", "conv"],
)
def test_profile_flops_are_twice_the_multiply_adds(model):
    assert profile(model, 4, 10, CPU).flops == 2 * (3 * 4 * 4) * 10


@pytest.mark.parametrize("summarize", [
    lambda model: profile(model, 8, 10, CPU),
    lambda model: table(model, 8),
], ids=["profile", "table"])  # fmt: skip
def test_leaves_the_model_and_the_rng_as_they_were(summarize):
    torch.manual_seed(0)
    model = bn_net().train()
    model[2].eval()  # a frozen BatchNorm must stay in eval
    model[2].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    summarize(model)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model] == [True, True, False, True, True, True, True]


def test_table_shows_layers_and_totals():
    text = table(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), 8, depth=1)
    assert "Conv2d: 1-1" in text and "[1, 4, 6, 6]" in text
    assert total_params(text) == 3 * 4 * 9 + 4


def test_profile_rejects_a_wrong_number_of_classes():
    with pytest.raises(UserError) as e:
        profile(bn_net(num_classes=5), 8, 10, CPU)
    assert str(e.value) == (
        "model outputs (1, 5) for one image, expected (1, 10): "
        "does its classifier take num_classes?"
    )


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_profile_rejects_a_non_tensor_output_and_a_failing_forward():
    with pytest.raises(UserError, match=r"^model outputs tuple for one image, expected \(1, 10\)"):
        profile(Pair(), 8, 10, CPU)
    with pytest.raises(UserError, match=r"^model forward failed on a 1×3×8×8 batch: RuntimeError"):
        profile(nn.Linear(5, 10), 8, 10, CPU)


def test_describe():
    assert Profile(11_180_000, 52, 556_000_000).describe() == (
        "11.18 M parameters (52 trainable), 556.00 MFLOPs per image"
    )


# --- init schemes -------------------------------------------------------------------------------


def init_net() -> nn.ModuleDict:
    """Layers large enough that their empirical std is within 1-2% of the theoretical one."""
    net = nn.ModuleDict({
        "linear": nn.Linear(512, 512),
        "conv": nn.Conv2d(64, 128, 3),
        "deconv": nn.ConvTranspose2d(128, 64, 3),
        "bn": nn.BatchNorm2d(128),
        "ln": nn.LayerNorm(512),
        "gn": nn.GroupNorm(8, 128),
    })  # fmt: skip
    with torch.no_grad():  # norms start at weight 1, bias 0 anyway: make the reset visible
        for name in ("bn", "ln", "gn"):
            net[name].weight.fill_(0.5)
            net[name].bias.fill_(0.3)
    return net


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scheme", ["kaiming_normal", "xavier_uniform", "trunc_normal"])
def test_scheme_draws_the_expected_std(scheme):
    torch.manual_seed(0)
    net = init_net()
    initialize(net, scheme)
    for name in ("linear", "conv", "deconv"):
        weight = net[name].weight
        expected = expected_std(scheme, weight)
        assert abs(weight.std().item() - expected) < 0.1 * expected, (name, expected)
        assert torch.count_nonzero(net[name].bias) == 0
    for name in ("bn", "ln", "gn"):
        assert torch.all(net[name].weight == 1) and torch.all(net[name].bias == 0)


def test_trunc_normal_std_is_shrunk_by_the_truncation():
    assert expected_std("trunc_normal", torch.empty(8, 8)) == pytest.approx(0.01759, abs=1e-5)


@pytest.mark.parametrize("scheme", ["kaiming_normal", "xavier_uniform", "trunc_normal"])
def test_scheme_follows_the_global_seed(scheme):
    def init(seed: int) -> dict[str, torch.Tensor]:
        net = init_net()
        torch.manual_seed(seed)
        initialize(net, scheme)
        return state(net)

    a, b, c = init(1), init(1), init(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["linear.weight"], c["linear.weight"])


def test_default_changes_nothing():
    net = init_net()
    before = state(net)
    initialize(net, "default")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_unknown_scheme():
    with pytest.raises(UserError, match=r"unknown model.init 'nope'; valid: default, kaiming_n"):
        initialize(nn.Linear(2, 2), "nope")


def test_schemes_match_the_config_choices():
    choices = typing.get_args(typing.get_type_hints(config.ModelConfig)["init"])
    assert set(SCHEMES) == set(choices)
