"""Per-Gaussian row tensors that grow and shrink together, with one shared row order.

Every place that holds per-Gaussian rows (GPU parameters, their Adam state, densification
statistics, the pinned host store) applies the same :class:`Compaction`, so row ``i`` means the
same Gaussian everywhere, and offload modes stay comparable number for number.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Compaction:
    """Removing rows by filling each hole below the new length with a survivor from above it.

    Costs O(removed) moves instead of shifting every row: survivors ``movers`` (ascending) go
    to ``holes`` (ascending), then the table is cut to ``new_len`` rows.
    """

    holes: Tensor  # int64
    movers: Tensor  # int64
    new_len: int

    @staticmethod
    def from_keep(keep: Tensor) -> Compaction:
        keep = keep.bool()
        new_len = int(keep.sum())
        holes = torch.nonzero(~keep[:new_len]).squeeze(1)
        movers = torch.nonzero(keep[new_len:]).squeeze(1) + new_len
        return Compaction(holes, movers, new_len)

    def apply_(self, rows: Tensor) -> Tensor:
        """Apply to a tensor of rows in place; returns the first ``new_len`` rows (a view)."""
        if self.holes.numel():
            holes = self.holes.to(rows.device)
            rows[holes] = rows[self.movers.to(rows.device)]
        return rows[: self.new_len]


class RowTable:
    """Named tensors ``[N, ...]`` on one device with spare capacity, so appends are amortised.

    ``table[name]`` is a view of the live rows; writes through it land in the table.
    """

    def __init__(self, tensors: Mapping[str, Tensor], growth: float = 1.5) -> None:
        lengths = {t.shape[0] for t in tensors.values()}
        if len(lengths) > 1:
            raise ValueError(f"row counts differ: {lengths}")
        self._len = lengths.pop() if lengths else 0
        self._growth = growth
        self._buffers = {name: t.contiguous().clone() for name, t in tensors.items()}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, name: str) -> Tensor:
        return self._buffers[name][: self._len]

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for name in self._buffers:
            yield name, self[name]

    @property
    def capacity(self) -> int:
        return next(iter(self._buffers.values())).shape[0] if self._buffers else 0

    def reserve(self, rows: int) -> None:
        """Make room for at least ``rows`` rows in total."""
        if rows <= self.capacity:
            return
        for name, buf in self._buffers.items():
            grown = buf.new_empty((rows, *buf.shape[1:]))
            grown[: self._len] = buf[: self._len]
            self._buffers[name] = grown

    def append(self, rows: Mapping[str, Tensor]) -> None:
        """Append rows; ``rows`` must name every tensor of the table."""
        count = next(iter(rows.values())).shape[0]
        if set(rows) != set(self._buffers):
            raise ValueError(f"append needs {sorted(self._buffers)}, got {sorted(rows)}")
        if self._len + count > self.capacity:
            self.reserve(max(self._len + count, int(self.capacity * self._growth) + 1))
        for name, value in rows.items():
            self._buffers[name][self._len : self._len + count] = value
        self._len += count

    def compact(self, plan: Compaction) -> None:
        for buf in self._buffers.values():
            plan.apply_(buf[: self._len])
        self._len = plan.new_len

    def state(self) -> dict[str, Tensor]:
        """The live rows, copied to the CPU (for checkpoints and export)."""
        return {name: t.detach().cpu().clone() for name, t in self.items()}
