"""Packed attribute rows and their Adam: key attributes dense on the GPU, the rest in host
memory with lazy Adam on the CPU.

A host row is brought up to date only when it receives a gradient (or before it is copied,
saved or exported), so a step costs host work in proportion to the rows a batch sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.model.spec import AttributeSpec, pack_rows, row_layout, unpack_rows
from clm.model.table import Compaction, RowTable
from clm.offload.host_store import HostStore
from clm.optim.cpu_adam import CpuRowAdam
from clm.optim.gpu_adam import adam_step_table
from clm.optim.lazy_adam import AdamConfig, Segment, SkipTable
from clm.optim.learning_rates import LearningRates


class SkipTables:
    """A skip table per attribute of a row layout, advanced with its learning rates (lazy Adam
    catches rows up from them)."""

    def __init__(
        self,
        attrs: Sequence[AttributeSpec],
        lrs: LearningRates,
        config: AdamConfig,
        device: torch.device,
    ) -> None:
        self.layout, self.width = row_layout(attrs)
        self.lrs = lrs
        self.config = config
        self.tables = {seg.attr.name: SkipTable(config, device=device) for seg in self.layout}

    def advance_to(self, step: int) -> None:
        """Fold in learning rates up to ``step`` (after every update of that step)."""
        for seg in self.layout:
            self._advance(self.tables[seg.attr.name], seg.attr.name, step)

    def _advance(self, table: SkipTable, name: str, step: int) -> None:
        for t in range(table.step + 1, step + 1):
            table.advance(t, self.lrs.at(name, t))

    def segments(self, step: int) -> list[Segment]:
        """The layout's column ranges with their rates and tables (attributes without columns,
        such as the higher SH bands at degree 0, have none)."""
        return [
            Segment(s.start, s.end, self.lrs.at(s.attr.name, step), self.tables[s.attr.name])
            for s in self.layout
            if s.end > s.start
        ]


class _ScratchChunk:
    """One chunk of ``rows`` (a power of two) host rows, laid out as a store for the CPU Adam."""

    def __init__(self, rows: int, width: int) -> None:
        self.param_chunks = [torch.zeros(rows, width)]
        self.exp_avg_chunks = [torch.zeros(rows, width)]
        self.exp_avg_sq_chunks = [torch.zeros(rows, width)]
        self.last_chunks = [torch.zeros(rows, dtype=torch.int32)]

    def arrays(self) -> tuple[list[Tensor], ...]:
        return self.param_chunks, self.exp_avg_chunks, self.exp_avg_sq_chunks, self.last_chunks


class CaughtUpCopies:
    """Rows brought up to a step in a scratch copy (reused by the next call), by the CPU Adam's
    own kernel, leaving the rows themselves as they are (exports of lazily updated rows)."""

    def __init__(self, width: int, config: AdamConfig, threads: int | None = None) -> None:
        self.width, self.config, self.threads = width, config, threads
        self._scratch: _ScratchChunk | None = None
        self._adam: CpuRowAdam | None = None

    def __call__(
        self,
        param: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        last: Tensor,
        step: int,
        segments: Sequence[Segment],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``[n, width]`` rows and their ``last``, caught up to ``step`` (tables at ``step``)."""
        n = param.shape[0]
        if self._scratch is None or self._scratch.param_chunks[0].shape[0] < n:
            self._scratch = _ScratchChunk(1 << max(0, n - 1).bit_length(), self.width)
            self._adam = CpuRowAdam(self._scratch, self.config, threads=self.threads)
        arrays = self._scratch.arrays()
        for chunks, values in zip(arrays, (param, exp_avg, exp_avg_sq, last), strict=True):
            chunks[0][:n].copy_(values)
        assert self._adam is not None
        self._adam.catch_up(torch.arange(n), step, segments)
        return tuple(chunks[0][:n] for chunks in arrays[:3])


class HostRows(SkipTables):
    """Rows in a :class:`HostStore`, updated by the native CPU Adam."""

    def __init__(
        self,
        attrs: Sequence[AttributeSpec],
        lrs: LearningRates,
        config: AdamConfig,
        *,
        pinned: bool,
        max_bytes: int | None = None,
        chunk_shift: int = 20,
        threads: int | None = None,
    ) -> None:
        super().__init__(attrs, lrs, config, torch.device("cpu"))
        self.store = HostStore(self.width, chunk_shift, pinned=pinned, max_bytes=max_bytes)
        self.adam = CpuRowAdam(self.store, config, threads=threads)
        self.rows_caught_up = 0  # rows whose skipped steps were applied (read and written)
        self._copies = CaughtUpCopies(self.width, config, threads)  # for exports

    def __len__(self) -> int:
        return len(self.store)

    def step_rows(
        self, rows: Tensor, grads: Tensor, width: int, step: int, skip_zero: bool = True
    ) -> int:
        """Adam step ``step`` for ``rows`` (their first update at this step); returns how many
        were stepped (with ``skip_zero``, a row without gradient is left for its catch-up)."""
        self.advance_to(step - 1)
        return self.adam.step_rows(rows, grads, width, step, self.segments(step), skip_zero)

    def catch_up(
        self,
        rows: Tensor | None,
        step: int,
        width: int | None = None,
    ) -> None:
        """Bring ``rows`` (all when None) up to ``step``, the last step applied.

        ``width`` limits the columns touched: columns of SH bands not yet active have never had
        a gradient, so their moments are zero and their skipped steps change nothing.
        """
        self.advance_to(step)
        if len(self.store):
            self.rows_caught_up += self.adam.catch_up(rows, step, self.segments(step), width)

    def append(self, params: Mapping[str, Tensor], step: int) -> None:
        self.store.append(pack_rows(dict(params), self.layout), step)

    def append_copies(self, src: Tensor, step: int) -> None:
        """Copy rows ``src`` (already up to date at ``step``) to new rows, moments zeroed."""
        self.store.append(self.store.gather_params(src), step)

    def compact(self, plan: Compaction) -> None:
        self.store.compact(plan)

    def state_chunks(
        self, step: int, rows: int, lazy: bool = False
    ) -> Iterator[tuple[int, int, tuple[dict[str, Tensor], ...], Tensor | None]]:
        """``(start, stop, (params, exp_avg, exp_avg_sq), last)`` for every range of at most
        ``rows`` rows (never across a store chunk), unpacked into attributes. The rows are left
        as they are: with ``lazy``, views of the store and each row's ``last``; otherwise
        copies caught up to ``step`` (``last`` None)."""
        self.advance_to(step)
        segments = self.segments(step)
        store = self.store
        start = 0
        while start < len(store):
            stop = min(start + rows, len(store), (start | (store.chunk_rows - 1)) + 1)
            if lazy:
                state, last = store.rows(start, stop), store.last_rows(start, stop)
            else:
                held = (*store.rows(start, stop), store.last_rows(start, stop))
                state, last = self._copies(*held, step, segments), None
            yield start, stop, tuple(unpack_rows(x, self.layout) for x in state), last
            start = stop

    def clear(self) -> None:
        self.store.clear()

    def append_state(
        self,
        params: Mapping[str, Tensor],
        exp_avg: Mapping[str, Tensor],
        exp_avg_sq: Mapping[str, Tensor],
        step: int,
        last: Tensor | None = None,
    ) -> None:
        """Add rows with their Adam moments, up to date at ``step`` (or each at its ``last``)."""
        pack = lambda d: pack_rows(dict(d), self.layout)  # noqa: E731
        self.store.append(pack(params), step, pack(exp_avg), pack(exp_avg_sq), last)


@dataclass(frozen=True)
class ChunkCuts:
    """:meth:`DeviceRows.locate`'s answer: ``starts`` (on the host once ``ready`` is done;
    None off CUDA) and the number of rows located."""

    starts: Tensor
    ready: torch.cuda.Event | None
    count: int

    def bounds(self) -> list[int]:
        """Each chunk's first position in the rows, then their count."""
        if self.ready is not None:
            self.ready.synchronize()
        return [*self.starts.tolist(), self.count]


class DeviceRows:
    """Key attributes packed ``[N, width]`` on the device, with dense Adam.

    Culling reads every key row each step, so they must all be exactly what dense Adam gives:
    rows a batch did not see take their zero-gradient step too. The batch's gradients arrive
    for its rows only; the update walks the table in chunks and scatters them into a chunk-sized
    zero gradient, so no ``[N, width]`` gradient is ever allocated.
    """

    def __init__(
        self,
        attrs: Sequence[AttributeSpec],
        params: Mapping[str, Tensor],
        lrs: LearningRates,
        config: AdamConfig,
        device: torch.device,
        chunk_rows: int = 1 << 22,
        grow_through_host: bool = False,
    ) -> None:
        self.layout, self.width = row_layout(attrs)
        self.grow_through_host = grow_through_host
        self.lrs = lrs
        self.config = config
        self.device = device
        self.chunk_rows = chunk_rows
        packed = pack_rows(dict(params), self.layout).to(device)
        self.table = RowTable(
            {
                "param": packed,
                "exp_avg": torch.zeros_like(packed),
                "exp_avg_sq": torch.zeros_like(packed),
            }
        )

    def __len__(self) -> int:
        return len(self.table)

    @property
    def param(self) -> Tensor:
        return self.table["param"]

    def views(self) -> dict[str, Tensor]:
        """Per-attribute views of the parameters."""
        return unpack_rows(self.param, self.layout)

    def locate(self, rows: Tensor) -> ChunkCuts:
        """Where each chunk's rows begin in ``rows`` (ascending), copied to the host in the
        background: located when a batch's rows are known, :meth:`step_sparse` reads them at
        the end of the step without waiting for the device."""
        starts = torch.arange(0, len(self.table), self.chunk_rows, device=rows.device)
        cuts = torch.searchsorted(rows, starts).to(torch.int64)
        if rows.device.type != "cuda":
            return ChunkCuts(cuts, None, rows.numel())
        host = torch.empty(cuts.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(cuts, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return ChunkCuts(host, event, rows.numel())

    def step_sparse(
        self, rows: Tensor, grads: Tensor, step: int, cuts: ChunkCuts | None = None
    ) -> None:
        """Adam step ``step`` for every row; ``rows`` (unique, ascending) have gradients
        ``grads``; ``cuts``: :meth:`locate` of ``rows`` (None: located now, a host sync).

        A chunk's gradient rows are a slice of ``rows``: they are scattered into a zeroed
        chunk-sized gradient, so the work is one pass over the table and one over ``rows``.
        """
        n = len(self.table)
        bounds = (cuts or self.locate(rows)).bounds()
        assert len(bounds) == -(-n // self.chunk_rows) + 1, "located for another table size"
        p, m, v = self.table["param"], self.table["exp_avg"], self.table["exp_avg_sq"]
        lrs = [(s.start, s.end, self.lrs.at(s.attr.name, step)) for s in self.layout]
        for k, a in enumerate(range(0, n, self.chunk_rows)):
            b = min(a + self.chunk_rows, n)
            lo, hi = bounds[k], bounds[k + 1]
            grad = torch.zeros(b - a, self.width, device=self.device)
            grad[rows[lo:hi] - a] = grads[lo:hi]
            adam_step_table(p[a:b], grad, m[a:b], v[a:b], step, lrs, self.config)

    def room_for(self, count: int) -> int:
        """The capacity appending ``count`` rows grows the table to (its own when it fits)."""
        needed = len(self.table) + count
        if needed <= self.table.capacity:
            return self.table.capacity
        return max(needed, int(self.table.capacity * 1.5) + 1)

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows. With ``grow_through_host`` (a hard GPU budget) the live rows
        wait in host memory while the table is reallocated, so old and new never coexist."""
        if rows <= self.table.capacity:
            return
        if not self.grow_through_host:
            self.table.reserve(rows)
            return
        held = {name: t.cpu() for name, t in self.table.items()}
        self.table = RowTable({name: t[:0].to(self.device) for name, t in held.items()})
        self.table.reserve(rows)
        self.table.append({name: t.to(self.device) for name, t in held.items()})

    def append(self, params: Mapping[str, Tensor]) -> None:
        packed = pack_rows(dict(params), self.layout).to(self.device)
        zeros = torch.zeros_like(packed)
        self.reserve(self.room_for(packed.shape[0]))
        self.table.append({"param": packed, "exp_avg": zeros, "exp_avg_sq": zeros})

    def compact(self, plan: Compaction) -> None:
        self.table.compact(plan)

    def zero_moments(self, name: str) -> None:
        seg = next(s for s in self.layout if s.attr.name == name)
        self.table["exp_avg"][:, seg.start : seg.end] = 0
        self.table["exp_avg_sq"][:, seg.start : seg.end] = 0

    def state_chunk(self, start: int, stop: int) -> tuple[dict[str, Tensor], ...]:
        """Parameters and both moments of rows ``[start, stop)``, unpacked, on the CPU."""
        return tuple(
            unpack_rows(self.table[key][start:stop].cpu(), self.layout)
            for key in ("param", "exp_avg", "exp_avg_sq")
        )

    def clear(self, capacity: int) -> None:
        """Drop every row; keep room for ``capacity`` (a hard budget reserved it)."""
        empty = torch.empty(0, self.width, device=self.device)
        self.table = RowTable({"param": empty, "exp_avg": empty, "exp_avg_sq": empty})
        self.table.reserve(capacity)

    def append_state(
        self,
        params: Mapping[str, Tensor],
        exp_avg: Mapping[str, Tensor],
        exp_avg_sq: Mapping[str, Tensor],
    ) -> None:
        pack = lambda d: pack_rows(dict(d), self.layout).to(self.device)  # noqa: E731
        self.reserve(self.room_for(next(iter(params.values())).shape[0]))
        self.table.append(
            {"param": pack(params), "exp_avg": pack(exp_avg), "exp_avg_sq": pack(exp_avg_sq)}
        )
