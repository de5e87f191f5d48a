"""`data.on_error` for every source: readers leave unreadable samples out of their batch and
report them; `PolicyLoader` skips and counts them or stops the run, in the main process. It also
turns a stuck worker (`data.timeout_s`) into one line naming what the late batch reads."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import DataLoader

from distnn.errors import UserError

log = logging.getLogger("distnn.data")

# What a reader's __getitem__ returns: uint8 images, labels and sample indices of the samples
# it could read, and one line for each sample it left out.
Batch = tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]


class SampleError(UserError):
    """A sample that cannot be read or decoded (what `data.on_error` decides about)."""


class Fatal(str):
    """A reader's problem line that ends the run whatever `data.on_error` says (storage that
    stayed unreachable: every later batch would wait as long again). A str, so it travels back
    from a worker in the batch's problems."""


class Unreadable(str):
    """A reader's line for a sample it left out, and which sample (prediction lists it in its
    output with the reason)."""

    index: int
    reason: str

    def __new__(cls, line: str, index: int, why: str) -> Unreadable:
        self = super().__new__(cls, line)
        self.index, self.reason = index, why
        return self

    def __reduce__(self) -> tuple:  # back from a worker with its index
        return Unreadable, (str(self), self.index, self.reason)


@dataclass
class DataErrors:
    """Unreadable samples skipped on this rank (cumulative): what the monitor logs."""

    skipped: int = 0
    last: str = ""
    recent: list[str] = field(default_factory=list)
    listed: list[str] | None = None  # every line, for a consumer that drains them (predict)

    def add(self, problems: list[str]) -> None:
        self.skipped += len(problems)
        self.last = problems[-1]
        self.recent = (self.recent + problems)[-20:]
        if self.listed is not None:
            self.listed += problems
        log.warning(
            "warning: skipped %d unreadable sample(s), %d so far: %s",
            len(problems), self.skipped, problems[0],
        )  # fmt: skip


class PolicyLoader:
    """A DataLoader over a reader that yields `Batch`es, plus the error policy, applied in the
    main process so a `raise` is one clean line, not a worker traceback. Yields (uint8 images,
    labels) like a plain DataLoader; with `indices`, (images, labels, sample indices).
    `timeout_s`: the DataLoader's own `timeout` (workers only), whose RuntimeError becomes a
    UserError naming what the late batch reads (its dataset's `where(batch)`, the batch as its
    sampler yields it)."""

    def __init__(
        self,
        loader: DataLoader,
        errors: DataErrors,
        on_error: Literal["skip", "raise"],
        train: bool,
        timeout_s: float = 0,
        indices: bool = False,
    ) -> None:
        self.loader, self.errors, self.on_error, self.train = loader, errors, on_error, train
        self.timeout_s, self.indices = timeout_s, indices

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        last = None
        for x, y, problems, index in self._batches():
            if fatal := next((p for p in problems if isinstance(p, Fatal)), None):
                raise UserError(fatal)
            if problems:
                if self.on_error == "raise":
                    raise UserError(f"{problems[0]} (data.on_error=skip skips such samples)")
                self.errors.add(problems)
            if len(y) == 0:
                if not self.train:
                    continue  # evaluation counts the samples it read; nothing to repeat
                if last is None:
                    raise UserError(f"no readable sample in the first batch: {problems[0]}")
                x, y, index = last  # repeat the last good batch: every rank keeps its steps
            last = (x, y, index)
            yield (x, y, index) if self.indices else (x, y)

    def _batches(self) -> Iterator[Batch]:
        """The loader's batches; its timeout as one line naming the late batch's reads."""
        batches = iter(self.loader)
        for k in itertools.count():
            waiting = time.monotonic()
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError:  # torch's timeout; a dead worker's error comes at once
                if not self.timeout_s or time.monotonic() - waiting < self.timeout_s:
                    raise
                # The DataLoader yields batches in the sampler's order: the late one is the k-th.
                late = next(itertools.islice(iter(self.loader.sampler), k, None), None)
                reading = "" if late is None else f" reading {self.loader.dataset.where(late)}"
                raise UserError(
                    f"no batch from the data loader's workers for {self.timeout_s:g} s "
                    f"(data.timeout_s): a worker is stuck{reading}"
                ) from None
            yield batch
