"""Config: defaults, YAML + dotted overrides, type conversion, one-line errors, the CLI flags."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from distnn import config
from distnn.config import Config
from distnn.errors import UserError
from tests.conftest import run_cli


def user_error(fn, *args) -> str:
    """The message of the UserError `fn(*args)` raises; it must be a single line."""
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def flatten(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} for every leaf of a nested config dict, in order (a `kwargs` or
    `storage_options` mapping is one leaf: keyword arguments of a builder or a client)."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict) and name not in ("kwargs", "storage_options"):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


# --- loading and merging ----------------------------------------------------------------------


def test_defaults_load():
    cfg = config.load()
    assert cfg == Config()
    assert cfg.optim.lr == 0.1
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.train.batch_size == 128
    assert cfg.model.num_classes is None
    assert cfg.precision == "fp32"
    assert cfg.log.wandb.mode == "auto"
    assert cfg.run_dir.as_posix() == "runs/default"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text(
        "optim:\n  lr: 0.05\n  momentum: 0.8\ntrain:\n  epochs: 7\n"
        "log:\n  wandb:\n    project: from-yaml\nprecision: bf16\n"
    )
    cfg = config.load(path, ["optim.lr=0.5", "log.wandb.project=from-cli", "train.seed=3"])
    assert cfg.optim.lr == 0.5  # override beats YAML
    assert cfg.log.wandb.project == "from-cli"
    assert cfg.optim.momentum == 0.8  # YAML beats defaults
    assert cfg.train.epochs == 7
    assert cfg.precision == "bf16"
    assert cfg.train.seed == 3  # override of a key the YAML does not set
    assert cfg.optim.weight_decay == 5e-4  # untouched default
    assert cfg.train.batch_size == 128
    # The sections the YAML does not mention keep every default.
    assert cfg.data == Config().data


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert config.load(path) == Config()


ROUND_TRIP = [
    "run.name=0123",  # must stay the string '0123', not YAML's octal 83
    "optim.name=adamw",
    "optim.lr=3e-4",
    "optim.betas=0.8,0.95",
    "optim.eps=1e-10",
    "model.num_classes=100",
    "model.channels_last=true",
    "train.batch_size=64",
    "ckpt.every_steps=1e3",
    "precision=bf16",
    "log.wandb.mode=offline",
    "data.source=cifar100",
]


def test_yaml_round_trip(tmp_path):
    cfg = config.load(None, ROUND_TRIP)
    assert cfg != Config()
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml(cfg))
    back = config.load(path)
    assert back == cfg
    assert back.run.name == "0123"
    assert back.optim.eps == 1e-10
    assert back.optim.betas == [0.8, 0.95]
    # The YAML is the nested dict, section by section.
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 3e-4


def test_dict_round_trip():
    cfg = config.load(None, ROUND_TRIP)
    tree = config.to_dict(cfg)
    assert tree["log"]["wandb"]["mode"] == "offline"
    assert tree["ckpt"]["every_steps"] == 1000
    assert config.from_dict(tree) == cfg
    assert config.from_dict(config.to_dict(Config())) == Config()


# --- type conversion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "get", "expected", "kind"),
    [
        ("optim.lr=1e-3", lambda c: c.optim.lr, 0.001, float),
        ("optim.lr=1", lambda c: c.optim.lr, 1.0, float),
        ("train.epochs=3", lambda c: c.train.epochs, 3, int),
        ("ckpt.every_steps=1e3", lambda c: c.ckpt.every_steps, 1000, int),
        ("model.num_classes=null", lambda c: c.model.num_classes, None, type(None)),
        ("model.num_classes=37", lambda c: c.model.num_classes, 37, int),
        ("optim.betas=0.8,0.99", lambda c: c.optim.betas, [0.8, 0.99], list),
        ("optim.betas=[0.5, 0.9]", lambda c: c.optim.betas, [0.5, 0.9], list),
        ("model.channels_last=true", lambda c: c.model.channels_last, True, bool),
        ("model.channels_last=false", lambda c: c.model.channels_last, False, bool),
        ("dist.timeout_s=30", lambda c: c.dist.timeout_s, 30.0, float),
        ("run.name=7", lambda c: c.run.name, "7", str),
        ("run.name=1.10", lambda c: c.run.name, "1.10", str),
        ("run.name=2024-01-01", lambda c: c.run.name, "2024-01-01", str),
        ("precision=fp16", lambda c: c.precision, "fp16", str),
        ("log.progress=off", lambda c: c.log.progress, "off", str),  # YAML would say False
    ],
)
def test_conversion(override, get, expected, kind):
    value = get(config.load(None, [override]))
    assert type(value) is kind
    assert value == expected
    if kind is list:
        assert all(type(v) is float for v in value)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_key_names_it_and_lists_valid_keys():
    message = user_error(config.load, None, ["optim.lrr=1"])
    assert "optim.lrr" in message
    valid = message.split("valid keys", 1)[1]
    for key in ("lr", "momentum", "betas", "weight_decay"):
        assert key in valid


def test_unknown_nested_key():
    message = user_error(config.load, None, ["log.wandb.projekt=x"])
    assert "log.wandb.projekt" in message
    assert "project" in message


def test_unknown_section():
    message = user_error(config.load, None, ["optimizer.lr=1"])
    assert "optimizer" in message
    for section in ("optim", "train", "data", "model"):
        assert section in message


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  epochz: 3\n")
    message = user_error(config.load, path)
    assert "train.epochz" in message
    assert "epochs" in message


def test_wrong_type():
    message = user_error(config.load, None, ["train.epochs=abc"])
    assert "train.epochs" in message
    assert "int" in message
    assert "abc" in message


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("train.epochs=2.5", "train.epochs", ["int"]),
        ("optim.lr=fast", "optim.lr", ["float"]),
        ("model.channels_last=1", "model.channels_last", ["bool"]),
        ("model.num_classes=ten", "model.num_classes", ["int"]),
        ("optim.betas=0.9,x", "optim.betas", ["float"]),
        ("optim=1", "optim", ["section"]),
    ],
)
def test_wrong_type_variants(override, key, words):
    message = user_error(config.load, None, [override])
    assert repr(key) in message
    for word in words:
        assert word in message


def test_bad_literal_lists_choices():
    message = user_error(config.load, None, ["precision=fp8"])
    assert "precision" in message
    assert "fp8" in message
    for choice in ("fp32", "bf16", "fp16"):
        assert choice in message


def test_override_without_equals():
    message = user_error(config.load, None, ["optim.lr"])
    assert "optim.lr" in message
    assert "key=value" in message
    user_error(config.load, None, ["=3"])


@pytest.mark.parametrize("value", ["0", "-8"])
def test_non_positive_batch_size(value):
    message = user_error(config.load, None, [f"train.batch_size={value}"])
    assert "train.batch_size" in message
    assert "> 0" in message


def test_range_checks():
    assert "train.epochs" in user_error(config.load, None, ["train.epochs=-1"])
    assert "data.workers" in user_error(config.load, None, ["data.workers=-2"])
    assert "optim.betas" in user_error(config.load, None, ["optim.betas=0.9"])
    assert "model.num_classes" in user_error(config.load, None, ["model.num_classes=1"])
    message = user_error(config.load, None, ["train.epochs=0", "train.max_steps=0"])
    assert "train.epochs" in message
    assert "train.max_steps" in message
    # Either limit alone is enough.
    assert config.load(None, ["train.epochs=0", "train.max_steps=5"]).train.max_steps == 5


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = user_error(config.load, path)
    assert str(path) in message
    assert "does not exist" in message


@pytest.mark.parametrize("text", ["- optim\n- train\n", "just a string\n", "42\n"])
def test_yaml_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    message = user_error(config.load, path)
    assert str(path) in message
    assert "mapping" in message


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [0.1\ntrain: {\n")
    message = user_error(config.load, path)
    assert str(path) in message
    assert "YAML" in message


# --- help -----------------------------------------------------------------------------------


def test_help_rows_cover_every_leaf_key():
    rows = config.help_rows()
    keys = [row[0] for row in rows]
    defaults = flatten(config.to_dict(Config()))
    assert keys == list(defaults)
    assert len(set(keys)) == len(keys)
    assert {"train.batch_size", "optim.betas", "log.wandb.mode", "precision"} <= set(keys)
    for key, type_name, default, help_text in rows:
        assert help_text.strip(), f"{key} has no help"
        assert type_name.strip(), f"{key} has no type"
        assert default == repr(defaults[key])
    by_key = {row[0]: row for row in rows}
    assert by_key["optim.lr"][1:3] == ("float", "0.1")
    assert by_key["model.num_classes"][1:3] == ("int | null", "None")
    assert by_key["precision"][1] == "fp32 | bf16 | fp16"


# --- the CLI, as a user runs it ---------------------------------------------------------------

# Each subprocess pays ~5 s of torch import: the two error paths, where exit code and stderr
# are the point, and --print-config, whose stdout users pipe into files, run as real processes
# (concurrently); --help-config runs in-process.
CLI_CASES = {
    "unknown_key": ("-m", "distnn.train", "optim.lrr=1"),
    "wrong_type": ("-m", "distnn.train", "train.epochs=abc"),
    "print_config": ("-m", "distnn.train", "--print-config", "optim.lr=0.5"),
}


@pytest.fixture(scope="module")
def cli_results():
    """The CLI runs, started together so their start-up costs overlap."""
    with ThreadPoolExecutor(len(CLI_CASES)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in CLI_CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize(
    ("case", "key"), [("unknown_key", "optim.lrr"), ("wrong_type", "train.epochs")]
)
def test_cli_user_error(cli_results, case, key):
    result = cli_results[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert key in lines[0]
    assert result.stdout == ""


def test_cli_print_config(cli_results):
    result = cli_results["print_config"]
    assert result.returncode == 0, result.stderr
    assert "  lr: 0.5" in result.stdout.splitlines()
    printed = yaml.safe_load(result.stdout)  # stdout is nothing but the YAML
    assert printed["optim"]["lr"] == 0.5
    assert config.from_dict(printed) == config.load(None, ["optim.lr=0.5"])


def test_cli_help_config(capsys):
    from distnn import train

    assert train.main(["--help-config"]) is None  # returns: exit status 0, training not run
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("| key |")
    assert lines[1].startswith("| --- |")
    table_keys = [line.split("`")[1] for line in lines[2:]]
    assert table_keys == [row[0] for row in config.help_rows()]
    assert "train.batch_size" in table_keys
    assert all(line.startswith("| `") and line.endswith(" |") for line in lines[2:])


def test_kwargs_mappings_take_dotted_overrides_typed_as_yaml():
    cfg = config.load(None, ["model.kwargs.depth=4", "model.kwargs.act=gelu", "model.kwargs.p=0.1",
                             "data.kwargs={fold: 2}", "data.kwargs.split_file=a.txt"])  # fmt: skip
    assert cfg.model.kwargs == {"depth": 4, "act": "gelu", "p": 0.1}
    assert cfg.data.kwargs == {"fold": 2, "split_file": "a.txt"}
    assert "model.kwargs" in user_error(config.load, None, ["model.kwargs=3"])
    again = config.from_dict(config.to_dict(cfg))  # the saved config rebuilds the same run
    assert again.model.kwargs == cfg.model.kwargs


def test_data_source_is_a_builtin_or_an_import_path():
    assert config.load(None, ["data.source=mylab.data:Scans"]).data.source == "mylab.data:Scans"
    message = user_error(config.load, None, ["data.source=mylab.data"])
    assert "'mylab.data'" in message and "pkg.module:callable" in message


def test_strategy_options_live_in_their_strategy_s_section():
    cfg = config.load(None, ["strategy.deepspeed.zero_stage=3", "strategy.ddp.static_graph=true"])
    assert cfg.strategy.deepspeed.zero_stage == 3 and cfg.strategy.ddp.static_graph
    for old, new in (
        ("zero_stage=3", "deepspeed.zero_stage"),
        ("bucket_cap_mb=1", "ddp.bucket_cap_mb"),
    ):
        message = user_error(config.load, None, [f"strategy.{old}"])
        assert message == f"config key 'strategy.{old.split('=')[0]}' is now 'strategy.{new}'"
