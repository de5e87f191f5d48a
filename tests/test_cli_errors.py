"""Bad input reaches the user as one clear line and exit code 2, never a traceback (in this
process: tests/test_config.py starts `python -m distnn.train` for the same path)."""

from __future__ import annotations

import pytest
import torch

from distnn.train import main
from tests.conftest import FAST, one_line_error


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.source=imagefolder", "data.root=/nonexistent/imgs"],
            ["/nonexistent/imgs", "train/"],
        ),
        (["model.name=resnet19"], ["resnet19", "resnet18", "tutorial_cnn"]),
        (["model.num_classes=5"], ["model.num_classes=5", "10 classes"]),
        (["data.source=cifar10", "data.root=/nonexistent/c"], ["cifar10", "data.download"]),
    ],
    ids=["missing-data-dir", "unknown-model", "num-classes-mismatch", "missing-cifar"],
)
def test_train_bad_input_is_one_line(tmp_path, capfd, overrides, expected):
    err = one_line_error(main, [f"run.dir={tmp_path}", *FAST, *overrides], capfd)
    for word in expected:
        assert word in err
    assert not (tmp_path / "default").exists()  # failed before any run dir was made
    assert not torch.distributed.is_initialized()
