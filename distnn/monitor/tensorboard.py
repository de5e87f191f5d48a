"""TensorBoard: the same scalars at the same steps as metrics.jsonl, under <run dir>/tb.

tensorboard --logdir runs      # every run side by side
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distnn import config as config_lib
from distnn.config import Config


class TensorBoardSink:
    def __init__(self, cfg: Config, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(cfg.run_dir) / "tb"
        self.graph = cfg.log.tensorboard_graph
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

    def first_batch(self, grid: np.ndarray, x: torch.Tensor, model: nn.Module, step: int) -> None:
        self.writer.add_image("train_batch", grid, step, dataformats="HWC")
        if self.graph:
            was_training = model.training
            model.eval()  # tracing runs forward once: no BatchNorm statistics update
            # In the parameters' dtype: DeepSpeed's bf16/fp16 modes keep the module in half
            # precision, and the trace runs outside autocast.
            dtype = next(model.parameters()).dtype
            try:
                self.writer.add_graph(model, x[:1].to(dtype))
            finally:
                model.train(was_training)

    def summary(self, values: dict[str, Any]) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
