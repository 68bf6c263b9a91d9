"""Adaptive residency: the offloaded rows that fit the GPU budget stay there.

Under the budget, the host rows that the training views see most often live on the GPU with
their Adam moments and take a dense GPU Adam step every step, the arithmetic of
``--offload none``; the other rows take the host path (gather, flush, lazy CPU Adam). A row is
in one set at a time. While it is resident, its host copy is stale; when it leaves, its
parameters, moments and step are written back, so either side's state is exact.

The set is chosen from visit counts: every training view culled once (:meth:`ResidentRows.
count_views`), then each batch's culls; a densified row inherits its source's count. It is
chosen again after density control and whenever the budget changes, moving only the rows that
change sides, a bounded chunk at a time (no transient copy of the set on either side).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.model.spec import ColumnSegment
from clm.model.table import Compaction
from clm.offload.culling import Culler, CullResult
from clm.offload.lazy_rows import HostRows
from clm.optim.gpu_adam import adam_step_table
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.render.base import View

log = logging.getLogger("clm")

MOVE_ROWS = 1 << 20  # rows moved between the sets at a time
MIN_SLOTS = 1 << 16  # slots allocated at least (when the budget allows)
STEP_ROWS = 1 << 21  # rows per launch of the dense Adam (its temporaries are this size)
SLOT_BYTES_PER_COLUMN = 16  # a slot's parameter, two moments and gradient, float32
ROW_BYTES = 8  # every model row's slot number and visit count
# A measured budget keeps this multiple of the most a measured step took beyond what persists:
# a step's transients grow with the rows its views render, up to the row cache.
STEP_MARGIN = 1.25


@dataclass(frozen=True)
class ResidentBudget:
    """How many rows a GPU budget of ``budget`` bytes leaves room for beside the render
    workspace and row cache (``workspace``) and ``per_gaussian`` bytes for each row the key
    table has room for (its key attributes and moments, and its share of a batch that sees
    every row), past the ``counted`` rows whose bytes ``workspace`` already holds.

    The plan's budget counts every row and the worst case of each cost; a budget made from
    what training steps took (:meth:`measured`) counts the rows there were then."""

    budget: int
    workspace: int
    per_gaussian: int
    margin: float = 0.05  # of the budget, for the allocator's rounding and fragmentation
    counted: int = 0

    def slots(self, key_rows: int, width: int) -> int:
        """Resident rows of ``width`` floats beside a key table with room for ``key_rows``."""
        more = max(0, key_rows - self.counted) * self.per_gaussian
        free = self.budget * (1 - self.margin) - self.workspace - more
        return max(0, int(free) // (SLOT_BYTES_PER_COLUMN * width))

    def measured(self, held: int, step_most: int, key_rows: int, width: int) -> ResidentBudget:
        """This budget from what training took: ``held`` bytes allocated between steps besides
        the resident slots (the key table with room for ``key_rows``, the full row cache, and
        everything else that persists), and at most ``step_most`` more during a step, with
        :data:`STEP_MARGIN` for views busier than those measured, and the temporary of the
        dense Adam over resident rows of ``width`` floats (steps without them took none)."""
        return ResidentBudget(
            self.budget,
            held + int(step_most * STEP_MARGIN) + STEP_ROWS * width * 4,
            self.per_gaussian,
            self.margin,
            counted=key_rows,
        )


@dataclass
class Split:
    """A cull split by where its rows live: ``host``, the cull of the host rows alone, at
    positions ``at`` of the whole (None: all of it), and per view the positions of its
    resident rows (None: none are resident)."""

    host: CullResult
    at: Tensor | None = None
    resident: list[Tensor] | None = None


class ResidentRows:
    """Host-layout rows kept on the device in ``capacity`` slots, with per-row bookkeeping
    (``slot_of``: the slot of each model row or -1; ``seen``: its visit count)."""

    def __init__(
        self,
        layout: Sequence[ColumnSegment],
        width: int,
        lrs: LearningRates,
        config: AdamConfig,
        device: torch.device,
    ) -> None:
        self.layout, self.width = list(layout), width
        self.lrs, self.config, self.device = lrs, config, device
        self.slot_of = torch.zeros(0, dtype=torch.int32, device=device)
        self.seen = torch.zeros(0, dtype=torch.int32, device=device)
        self.views_counted = 0  # views whose visits ``seen`` holds
        self._empty(0)
        self.stale = True  # the set should be chosen again before the next step

    def _empty(self, capacity: int) -> None:
        zeros = lambda: torch.zeros(capacity, self.width, device=self.device)  # noqa: E731
        self.param, self.exp_avg, self.exp_avg_sq, self.grad = (zeros() for _ in range(4))
        self.members = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.used = 0  # slots below this may hold a row (the dense Adam's range)
        self.count = 0  # rows resident

    def _grow_slots(self, capacity: int) -> None:
        """More slots, the resident rows staying where they are."""
        old = self.capacity
        for name in ("param", "exp_avg", "exp_avg_sq", "grad"):
            grown = torch.zeros(capacity, self.width, device=self.device)
            grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        spare = torch.full((capacity - old,), -1, dtype=torch.int64, device=self.device)
        self.members = torch.cat([self.members, spare])

    @property
    def capacity(self) -> int:
        return self.param.shape[0]

    @property
    def nbytes(self) -> int:
        """Device bytes the slots take (not the per-row bookkeeping, which every row has)."""
        tensors = (self.param, self.exp_avg, self.exp_avg_sq, self.grad, self.members)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- following the model's rows -------------------------------------------------------

    def grow(self, src: Tensor) -> None:
        """Rows appended as copies of ``src``: on the host, with their sources' counts."""
        src = src.to(self.device)
        self.slot_of = torch.cat([self.slot_of, torch.full_like(src, -1, dtype=torch.int32)])
        self.seen = torch.cat([self.seen, self.seen[src]])
        self.stale = True

    def extend(self, count: int) -> None:
        """``count`` new rows, on the host and never seen."""
        pad = torch.full((count,), -1, dtype=torch.int32, device=self.device)
        self.slot_of = torch.cat([self.slot_of, pad])
        self.seen = torch.cat([self.seen, torch.zeros_like(pad)])
        self.stale = True

    def compact(self, plan: Compaction) -> None:
        """Follow the model's compaction; the slots of removed rows become free."""
        self.slot_of = plan.apply_(self.slot_of).clone()
        self.seen = plan.apply_(self.seen).clone()
        self.members.fill_(-1)
        live = torch.nonzero(self.slot_of >= 0).squeeze(1)
        self.members[self.slot_of[live].long()] = live
        self.count = live.numel()
        self.stale = True

    def reset(self, rows: int) -> None:
        """``rows`` rows, none resident and none seen (a model was loaded)."""
        self.slot_of = torch.full((rows,), -1, dtype=torch.int32, device=self.device)
        self.seen = torch.zeros(rows, dtype=torch.int32, device=self.device)
        self._empty(0)
        self.stale = True

    # ---- visits ---------------------------------------------------------------------------

    def count_views(
        self, culler: Culler, cull_inputs: tuple[Tensor, Tensor, Tensor], views: Sequence[View]
    ) -> None:
        """Add every view's visits (the training views, once at the start); ``cull_inputs``:
        positions, log-scales and opacity logits (:meth:`GaussianSpec.cull_inputs`)."""
        self.seen += culler.visit_counts(*cull_inputs, views)
        self.views_counted += len(views)

    def count_visits(self, ids: Tensor, vis: Tensor) -> None:
        """Add a batch's culls: ``vis[b, j]`` says view b sees row ``ids[j]``."""
        self.views_counted += vis.shape[0]
        if ids.numel():
            self.seen.index_add_(0, ids, vis.sum(0, dtype=torch.int32))

    # ---- the set --------------------------------------------------------------------------

    def slots(self, ids: Tensor) -> Tensor:
        """The slot of each of ``ids`` (int64), or -1 where the row is on the host."""
        return self.slot_of[ids].long()

    def split(self, culled: CullResult, per_view: bool = True) -> Split:
        """``culled`` split into its host rows and each view's resident rows (one host sync).
        Without ``per_view``, only the host rows: what the walk, before its own split, needs."""
        if self.count == 0:
            return Split(culled)
        on_host = self.slots(culled.ids) < 0
        at = torch.nonzero(on_host).squeeze(1)
        if not per_view:
            return Split(CullResult(culled.ids[at], culled.vis[:, at]), at)
        pairs = torch.nonzero(culled.vis & ~on_host)  # (view, position), by view
        counts = torch.bincount(pairs[:, 0], minlength=culled.vis.shape[0]).tolist()
        resident = list(torch.split(pairs[:, 1], counts))
        return Split(CullResult(culled.ids[at], culled.vis[:, at]), at, resident)

    def choose(self, host: HostRows, step: int, limit: int, fixed: bool) -> None:
        """Make the ``limit`` most-seen rows resident (all rows when they fit), moving only the
        rows that change sides; both sets are up to date at ``step``.

        ``fixed`` (a hard budget): the slots are allocated for ``limit`` rows at once, so the
        model's growth never reallocates them. Otherwise they are allocated for a quarter more
        rows than there are (at most ``limit``) and grown in place when the model outgrows them.
        """
        rows = self.slot_of.numel()
        keep = max(0, min(limit, rows))
        room = max(rows + rows // 4, MIN_SLOTS)
        capacity = max(0, limit) if fixed else min(max(limit, 0), room)
        if capacity < self.capacity or (fixed and capacity != self.capacity):
            self.release(host, step)
            self._empty(capacity)
        elif capacity > self.capacity:
            self._grow_slots(capacity)
        self.stale = False
        self.count = keep
        if keep == 0:
            return
        now = self.slot_of >= 0
        if keep == rows:
            want = torch.ones(rows, dtype=torch.bool, device=self.device)
        else:  # ties keep the rows already resident
            score = self.seen.long() * 2 + now
            want = torch.zeros(rows, dtype=torch.bool, device=self.device)
            want[torch.topk(score, keep, sorted=False).indices] = True
        leaving = torch.nonzero(now & ~want).squeeze(1)
        self._write_back(leaving, host, step)
        self.members[self.slots(leaving)] = -1
        self.slot_of[leaving] = -1
        entering = torch.nonzero(want & ~now).squeeze(1)
        free = torch.nonzero(self.members < 0).squeeze(1)[: entering.numel()]
        if free.numel():
            self.used = max(self.used, int(free[-1]) + 1)
        for lo in range(0, entering.numel(), MOVE_ROWS):
            ids, slots = entering[lo : lo + MOVE_ROWS], free[lo : lo + MOVE_ROWS]
            on_host = ids.cpu()
            host.catch_up(on_host, step)
            state = host.store.read_rows(on_host)
            for table, values in zip(
                (self.param, self.exp_avg, self.exp_avg_sq), state, strict=True
            ):
                table[slots] = values.to(self.device)
            self.members[slots] = ids
            self.slot_of[ids] = slots.to(torch.int32)
        visits = self.seen.sum(dtype=torch.float64)
        away = self.seen[self.slot_of < 0].sum(dtype=torch.float64)
        share = float(away / visits) if visits > 0 else 1.0 - keep / rows
        per_view = float(away) / max(self.views_counted, 1)
        log.info(
            "resident on the GPU: %.2fM of %.2fM rows (%.0f%%); the host path serves %.0f%% of "
            "the views' row visits, about %.1f MB per view each way at degree 3",
            keep / 1e6,
            rows / 1e6,
            100 * keep / rows,
            100 * share,
            per_view * self.width * 4 / 1e6,
        )

    def release(self, host: HostRows, step: int) -> None:
        """Write every resident row back to the host and free the slots' memory."""
        self._write_back(torch.nonzero(self.slot_of >= 0).squeeze(1), host, step)
        self.slot_of.fill_(-1)
        self._empty(0)
        self.stale = True

    def _write_back(self, ids: Tensor, host: HostRows, step: int) -> None:
        for lo in range(0, ids.numel(), MOVE_ROWS):
            part = ids[lo : lo + MOVE_ROWS]
            slots = self.slots(part)
            state = (t[slots].cpu() for t in (self.param, self.exp_avg, self.exp_avg_sq))
            host.store.write_rows(part.cpu(), *state, step)

    def write_range(self, host: HostRows, start: int, stop: int, step: int) -> None:
        """Bring the host copies of the resident rows among ``[start, stop)`` up to date (for a
        checkpoint that reads the host store); they stay resident."""
        ids = torch.nonzero(self.slot_of[start:stop] >= 0).squeeze(1) + start
        self._write_back(ids, host, step)

    # ---- values and updates ---------------------------------------------------------------

    def patch(self, ids: Tensor, values: Tensor, width: int) -> None:
        """Overwrite the rows of ``values`` (``[len(ids), >= width]``, on the device) whose
        model row is resident with the resident values."""
        slots = self.slots(ids)
        at = torch.nonzero(slots >= 0).squeeze(1)
        values[at, :width] = self.param[slots[at], :width]

    def step(self, step: int, width: int) -> None:
        """Dense Adam step ``step`` over every slot (unseen rows take their zero-gradient step,
        as in ``--offload none``); only the active ``width`` columns, whose rest has zero state."""
        if self.used == 0:
            return
        lrs = [
            (s.start, min(s.end, width), self.lrs.at(s.attr.name, step))
            for s in self.layout
            if s.start < width
        ]
        for a in range(0, self.used, STEP_ROWS):
            rows = slice(a, min(a + STEP_ROWS, self.used))
            p, g = self.param[rows, :width], self.grad[rows, :width]
            m, v = self.exp_avg[rows, :width], self.exp_avg_sq[rows, :width]
            adam_step_table(p, g, m, v, step, lrs, self.config, zero_grad=True)
