"""launch/*.sh: real torchrun jobs. 2 "nodes" of 1 process each meet through c10d rendezvous on
this host and train what one node of 2 processes trains (conftest's DDP reference; the
single-node script trains the user's package in tests/test_user_code.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import EQUIVALENCE, ROOT, assert_same_params, final_weights


def script(name: str, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, **(env or {})}
    return subprocess.Popen(
        ["bash", str(ROOT / "launch" / name), *args],
        env=full, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["single_node.sh", "multi_node.sh"])
def test_usage_on_h(name):
    out, _ = finish(script(name, "-h"), timeout=30)
    assert out.startswith(f"usage: launch/{name}") and "Environment:" in out


def test_multi_node_names_what_is_missing():
    proc = script("multi_node.sh", env={"NNODES": "2", "MASTER_ADDR": ""})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "MASTER_ADDR is required" in err
    proc = script("multi_node.sh", env={"NNODES": "2", "MASTER_ADDR": "x", "RDZV_BACKEND": "y"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "RDZV_BACKEND=y is not c10d or static" in err


@pytest.mark.timeout(300)
def test_two_nodes_by_rendezvous_equal_one_node_of_two(tmp_path, ddp_reference):
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RDZV_ID": "launch-test"}  # fmt: skip
    args = [f"run.dir={tmp_path}", "run.name=two", *EQUIVALENCE, "train.batch_size=8"]
    nodes = [script("multi_node.sh", *args, env=env) for _ in range(2)]
    for node in nodes:
        finish(node)
    assert_same_params(final_weights(tmp_path / "two"), final_weights(ddp_reference))
    assert (tmp_path / "two" / "summary.json").read_text().count('"world_size": 2') == 1
