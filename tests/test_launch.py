"""launch/*.sh: real torchrun jobs, one node with 2 processes and 2 "nodes" of 1 process each
meeting through c10d rendezvous on this host; the two must train the same weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import FAST, ROOT, final_weights

COMMON = [*FAST, "train.max_steps=4", "train.batch_size=16", "data.synthetic_train=256",
          "ckpt.epoch_end=false", "precision=fp32"]  # fmt: skip


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
def test_two_nodes_by_rendezvous_equal_one_node_of_two(tmp_path):
    one = script("single_node.sh", f"run.dir={tmp_path}", "run.name=one", *COMMON,
                 env={"NPROC": "2"})  # fmt: skip
    finish(one)
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RDZV_ID": "launch-test"}  # fmt: skip
    nodes = [script("multi_node.sh", f"run.dir={tmp_path}", "run.name=two", *COMMON, env=env)
             for _ in range(2)]  # fmt: skip
    for node in nodes:
        finish(node)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (tmp_path / "two" / "summary.json").read_text().count('"world_size": 2') == 1
