"""Bad input reaches the user as one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, run_cli


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


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
def test_train_bad_input_is_one_line(tmp_path, overrides, expected):
    r = run_cli("-m", "distnn.train", f"run.dir={tmp_path}", *FAST, *overrides)
    err = one_line_error(r)
    for word in expected:
        assert word in err
    assert not (tmp_path / "default").exists()  # failed before any run dir was made
