"""One `Run` fans every record out to the console and metrics.jsonl, on rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distnn import config as config_lib
from distnn.config import Config
from distnn.monitor import console
from distnn.parallel.env import Env


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; write them as null rather than produce a file others cannot parse.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


class Run:
    """The run directory and everything written to it. Non-zero ranks hold a Run too, so the
    caller never branches on rank; theirs writes nothing."""

    def __init__(self, cfg: Config, env: Env, total_steps: int, start_step: int = 0) -> None:
        self.dir = cfg.run_dir
        self.writes = env.is_main
        self.console = console.build(
            cfg.log.progress if self.writes else "off", total_steps, start_step
        )
        self.metrics = None
        if self.writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
            # Line-buffered and open for the whole run: a killed job keeps every record written.
            self.metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def log(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        self.metrics.write(json.dumps(_clean(record)) + "\n")
        self.console.log(record)

    def message(self, text: str) -> None:
        if self.writes:
            self.console.message(text)

    def summary(self, values: dict[str, Any]) -> None:
        if self.writes:
            path = self.dir / "summary.json"
            path.write_text(json.dumps(_clean(values), indent=2) + "\n")

    def close(self) -> None:
        self.console.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
