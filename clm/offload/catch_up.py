"""Host rows caught up as the GPU reads them.

Host rows take their skipped zero-gradient Adam steps lazily (:mod:`clm.optim.lazy_adam`): a
row unseen for some steps has not yet moved with its momentum, and the render must see it where
dense Adam would have put it. The row is not brought up to date in host memory first (a read
and a write of the row and both moments, on the CPU, before the load may start). The gather
reads the moments of a row with steps pending too, and computes its caught-up parameters on
the way (``kernels/gather.cu``), with the CPU Adam's float64 operations in the same order. The
host row stays as it was; the CPU Adam applies the same skipped steps when it next steps the
row, so the render saw exactly the parameters that step starts from. A row without gradient in
the batch is not stepped, and nothing of it is written anywhere.

:class:`SkipSums` holds what the gather needs: the skip sums of every attribute, on the device.
It keeps its own copies of the host rows' tables, advanced by the main thread while the CPU Adam
thread uses the host's; both are folded the same way from the same rates, so they agree bit for
bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.model.spec import AttributeSpec
from clm.offload.lazy_rows import SkipTables
from clm.optim.lazy_adam import AdamConfig, Segment
from clm.optim.learning_rates import LearningRates


@dataclass(frozen=True)
class CatchUpTo:
    """What a gather needs to catch rows up to ``step``."""

    step: int
    sums: Tensor  # [segments, >= step + 1] float64 on the device: skip sums by a row's last
    column_segment: Tensor  # [width] int32 on the device: the row of ``sums`` of each column
    segments: list[Segment]  # the same sums on the CPU (the torch twin of the gather)


class SkipSums(SkipTables):
    """The skip tables of the host rows' attributes, with a copy of their sums on ``device``
    (see the module docstring)."""

    def __init__(
        self,
        attrs: Sequence[AttributeSpec],
        lrs: LearningRates,
        config: AdamConfig,
        device: torch.device,
    ) -> None:
        super().__init__(attrs, lrs, config, torch.device("cpu"))
        self.device = device
        self.window = next(iter(self.tables.values())).window
        column_segment = torch.zeros(self.width, dtype=torch.int32)
        for i, seg in enumerate(self.layout):
            column_segment[seg.start : seg.end] = i
        self.column_segment = column_segment.to(device)
        self._sums = torch.zeros(len(self.layout), 1024, dtype=torch.float64, device=device)
        self._copied = 0  # the table step the device copy holds

    def to(self, step: int) -> CatchUpTo:
        """Advance the tables to ``step`` (never back) and bring the device copy up to date:
        only the entries an advance changed, a few hundred per step, are copied."""
        if step < self._copied:
            raise ValueError(f"skip sums are at step {self._copied}; cannot serve step {step}")
        self.advance_to(step)
        lo, hi = max(0, self._copied + 1 - self.window), step + 1
        if self._sums.shape[1] < hi:
            grown = torch.zeros(len(self.layout), 2 * hi, dtype=torch.float64, device=self.device)
            grown[:, : self._sums.shape[1]] = self._sums
            self._sums = grown
        if hi > lo:
            changed = torch.stack([self.tables[s.attr.name].sums[lo:hi] for s in self.layout])
            if self.device.type == "cuda":
                changed = changed.pin_memory()  # (an asynchronous copy, without a host sync)
            self._sums[:, lo:hi].copy_(changed, non_blocking=True)
        self._copied = step
        return CatchUpTo(step, self._sums, self.column_segment, self.segments(step))
