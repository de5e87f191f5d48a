"""Shared fixtures: small configs and datasets written in the official on-disk formats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distnn import config

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: no worker processes, no progress bar, runs under the test's tmp dir.
FAST = ["data.workers=0", "log.progress=off", "log.wandb.mode=disabled"]


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str) -> config.Config:
        return config.load(None, [f"run.dir={tmp_path / 'runs'}", *FAST, *overrides])

    return make


def run_cli(*args: str, timeout: float = 120, cwd: Path | None = None, env: dict | None = None):
    """Run `python -m ...` in a fresh process (exit codes and stderr as a user sees them)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=full_env,
    )
