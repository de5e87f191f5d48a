"""TensorBoard: the same scalars at the same steps as metrics.jsonl, under <run dir>/tb.

tensorboard --logdir runs      # every run side by side
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distnn import config as config_lib
from distnn.config import Config


class TensorBoardSink:
    def __init__(self, cfg: Config, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(cfg.run_dir) / "tb"
        # A resumed run replays the steps after its checkpoint: purge_step hides what an
        # earlier attempt logged from there on, so each step shows once.
        resumed = self.dir.is_dir() and any(self.dir.iterdir())
        self.writer = SummaryWriter(
            str(self.dir), purge_step=start_step + 1 if resumed else None, flush_secs=30
        )
        if not resumed:
            text = config_lib.to_yaml(cfg)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and _is_number(value):
                self.writer.add_scalar(key, value, step)

    def images(self, tag: str, grid: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, grid, step, dataformats="HWC")

    def summary(self, values: dict[str, Any]) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
