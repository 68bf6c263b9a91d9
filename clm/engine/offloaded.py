"""``--offload clm``: key attributes on the GPU, every other attribute in pinned host memory,
except the rows that fit the GPU budget, which stay there (adaptive residency).

One step, for a batch of views; each stage has its module in :mod:`clm.offload`:

1. **cull** all views against the key attributes, no PCIe traffic (``culling``), and split the
   visible rows into resident rows and host rows (``resident_rows``);
2. **read**: keep the rows each view's render reads, found by walking its pixels with the
   geometry (``read_rows``; a renderer that declares no reach reads every row it is given);
3. **plan** the host rows of the batch through the row cache (``plan``);
4. for each view in the planned order: **gather** its new host rows from pinned memory into
   cache slots (a kernel on the copy stream, one view ahead of rendering, ``gather``), caught
   up on the way where they have skipped Adam steps pending (``catch_up``), render
   from the cache and the resident rows, backpropagate, accumulate gradients, and **flush** the
   host rows whose last use this was to the CPU Adam thread, which updates them while the GPU
   renders the next views (``flush``);
5. dense Adam on the GPU for the key attributes and the resident rows; the next batch's
   culling overlaps the CPU Adam tail.

A view that sees more host rows than the cache holds is rendered in pieces, with the same
gradients as the whole image (:mod:`clm.engine.offloaded_pieces`). Only the coefficients of the
active SH degree move. On a machine without CUDA the same code runs with the torch twins of the
kernels and no streams.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from clm.engine.base import (
    Engine,
    LossFn,
    ObserveFn,
    StepStats,
)
from clm.engine.offloaded_pieces import InPieces
from clm.engine.offloaded_rows import RowsAcrossSets
from clm.model.spec import ColumnSegment, active_row_width, unpack_rows
from clm.offload.budget import GIB
from clm.offload.catch_up import CatchUpTo, SkipSums
from clm.offload.culling import CullResult
from clm.offload.flush import STAGING_ROWS, GradientFlush, on_stream, record_event
from clm.offload.gather import RowGather
from clm.offload.lazy_rows import ChunkCuts, DeviceRows, HostRows
from clm.offload.piece_grads import CropGrad, ImageGrad
from clm.offload.pieces import Piece, PieceCuller
from clm.offload.plan import BatchPlan, overlap_and_uses, plan_batch
from clm.offload.read_rows import ReadCull, read_cull, with_drawn
from clm.offload.resident_rows import ResidentBudget, ResidentRows, Split
from clm.offload.row_inputs import RowInputs, Source
from clm.offload.step_memory import MEASURED_STEPS, StepMemory
from clm.render.base import View, reach_of
from clm.render.splats import JOINED_INPUTS

__all__ = ["STAGING_ROWS", "OffloadEngine"]

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    """One train_step's views and callbacks, and what its groups of micro-batches accumulate."""

    views: Sequence[View]
    loss_fn: LossFn
    observe: ObserveFn
    sh_degree: int
    background: Tensor
    step: int
    width: int  # active columns of a host row
    stats: StepStats
    rows: Tensor  # ascending rows the batch renders
    key_grads: Tensor  # [rows, key width]
    settled: threading.Event  # set once the CPU Adam of the batches before is done
    catch_up: CatchUpTo  # what loads need to catch rows up to the last step
    in_pieces: dict[int, ImageGrad | CropGrad] = field(default_factory=dict)  # views in pieces
    key_cuts: ChunkCuts | None = None  # where the key Adam's chunks begin in rows
    walked: bool = False  # its rows are those the walk found read: nearly all get a gradient


class OffloadEngine(InPieces, RowsAcrossSets, Engine):
    lazy = True

    def __init__(
        self,
        params: Mapping[str, Tensor],
        *,
        cache_rows: int | None,
        staging_rows: int = STAGING_ROWS,
        max_host_bytes: int | None = None,
        chunk_shift: int = 20,
        cpu_threads: int | None = None,
        resident: int | ResidentBudget = 0,
        views: Sequence[View] = (),
        grow_through_host: bool = False,
        leave_unread: bool | None = None,
        **kwargs,
    ) -> None:
        """``staging_rows``: the most gradient rows the pinned staging ring may hold (it holds
        fewer while most rows are resident); ``resident``: how many rows may stay on the GPU (a
        count, or a byte budget that sets it from the key rows' room); ``views``: the training
        views, whose visits choose them first. ``grow_through_host``: a hard GPU budget is in
        force (see DeviceRows).
        ``leave_unread``: leave the rows no pixel reads out of each step, when the renderer
        declares its reach (:mod:`clm.offload.read_rows`); None does so on CUDA, where their
        host rows would cross PCIe (on the CPU the walk costs about what it saves)."""
        super().__init__(**kwargs)
        config = self.adam
        cuda = self.device.type == "cuda"
        self.key = DeviceRows(
            self.spec.key,
            params,
            self.lrs,
            config,
            self.device,
            grow_through_host=grow_through_host,
        )
        self.host = HostRows(
            self.spec.host,
            self.lrs,
            config,
            pinned=cuda,
            max_bytes=max_host_bytes,
            chunk_shift=chunk_shift,
            threads=cpu_threads,
        )
        self.host.append({a.name: params[a.name] for a in self.spec.host}, step=0)
        self.resident = ResidentRows(
            self.host.layout, self.host.width, self.lrs, config, self.device
        )
        self.resident.reset(len(self.host))
        self.resident_limit = resident
        # A planned budget is measured against the first steps, which may leave it room for more
        # resident rows (the budget then made from them is ``_measured_limit``).
        measure = cuda and isinstance(resident, ResidentBudget) and cache_rows is not None
        self.step_memory = StepMemory(self.device) if measure else None
        self._measured_limit: ResidentBudget | None = None
        self._training_views = list(views)
        self.gather = RowGather(self.host.store, self.device)
        self.culler = PieceCuller(self.device, bound=self.spec.cull.shape)
        self.inputs = RowInputs([self.key.layout, self.host.layout], JOINED_INPUTS)
        self.capacity = cache_rows
        width = self.host.width
        self.cache_param = torch.empty(0, width, device=self.device)
        self.cache_grad = torch.empty(0, width, device=self.device)
        self.flusher = GradientFlush(self.host, self.device, staging_rows)
        self._staging_rows = staging_rows  # the most the ring may hold
        self.skips = SkipSums(self.spec.host, self.lrs, config, self.device)
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._waited_seconds = 0.0
        if leave_unread is None:
            leave_unread = cuda
        self.reach = reach_of(self.render_fn) if leave_unread else None
        self._walk_refused = 0  # batches whose walk did not fit the GPU budget
        # Per row: may the CPU Adam of a batch not yet known to be done still write it?
        self._stepping: Tensor | None = None
        self._reach_segments = self._host_segments_read()

    # ---- basic facts ----------------------------------------------------------------------

    @property
    def num_gaussians(self) -> int:
        return len(self.key)

    @property
    def exposed_seconds(self) -> float:
        """Seconds the main thread waited for the CPU Adam over the run."""
        return self._waited_seconds

    def key_param(self, name: str) -> Tensor:
        return self.key.views()[name]

    def attribute_rows(self, name: str, ids: Tensor) -> Tensor:
        if any(a.name == name for a in self.spec.key):
            return self.key.views()[name][ids.to(self.device)]
        self._drain()
        rows = ids.cpu()
        self.host.catch_up(rows, self.step)
        packed = self.host.store.gather_params(rows).to(self.device)
        self.resident.patch(ids.to(self.device), packed, self.host.width)
        return unpack_rows(packed, self.host.layout)[name]

    def _host_segments_read(self) -> list[ColumnSegment]:
        """The leading host columns the reach reads (the attributes up to the last it reads
        there); with a reach that reads an attribute of neither table, there is no reach."""
        if self.reach is None:
            return []
        key = {a.name for a in self.spec.key}
        wanted = set(self.reach.reads) - key
        if not wanted <= {seg.attr.name for seg in self.host.layout}:
            self.reach = None
            return []
        end = max((seg.end for seg in self.host.layout if seg.attr.name in wanted), default=0)
        return [seg for seg in self.host.layout if seg.end <= end]

    def _ensure_cache(self, rows: int) -> None:
        if self.cache_param.shape[0] >= rows:
            return
        grown = max(rows, int(self.cache_param.shape[0] * 1.25))
        if self.capacity is not None:
            grown = min(self.capacity, grown)
        self.cache_param = self.cache_grad = None  # freed before the larger ones are made
        self.cache_param = torch.empty(grown, self.host.width, device=self.device)
        self.cache_grad = torch.zeros(grown, self.host.width, device=self.device)

    def _event(self, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event | None:
        return record_event(self.device, stream)

    # ---- residency ------------------------------------------------------------------------

    def _choose_resident(self) -> None:
        """Choose the resident rows again (at the start, and after density control)."""
        limit = self.resident_limit
        if isinstance(limit, ResidentBudget):
            budgets = [limit] if self._measured_limit is None else [limit, self._measured_limit]
            limit = max(b.slots(self.key.table.capacity, self.host.width) for b in budgets)
        if limit > 0 and self._training_views:
            self.resident.count_views(
                self.culler, self.spec.cull_inputs(self.key.views()), self._training_views
            )
            self._training_views = []
        self.resident.choose(self.host, self.step, limit, fixed=self.key.grow_through_host)
        # The ring holds a batch's gradient rows up to what is planned: no more than the rows
        # the host path has (a run whose rows are mostly resident pins a small ring).
        host_rows = len(self.host) - self.resident.count
        self.flusher.staging.fit(min(self._staging_rows, max(host_rows, STAGING_ROWS)))

    # ---- one step -------------------------------------------------------------------------

    def train_step(
        self,
        views: Sequence[View],
        loss_fn: LossFn,
        observe: ObserveFn,
        sh_degree: int,
        background: Tensor,
    ) -> None:
        step = self.step + 1
        width = active_row_width(self.spec.host, sh_degree)
        if self.resident.stale:  # (moving rows between the sets needs the host rows settled)
            self._drain()
            self._choose_resident()
        if self.step_memory is not None and self.resident.count == len(self.key):
            self.step_memory = None  # no host rows to give room to (nor a row cache to hold)
        if self.step_memory is not None:  # measured with the full row cache held
            self._ensure_cache(self.capacity)
            self.step_memory.start()
        # No drain: the CPU Adam of the last batch goes on while this one is culled and
        # planned; the first load waits for it (loads read the rows it writes).
        settled = self.flusher.worker.mark()
        catch_up = self.skips.to(step - 1)
        culled = self._cull(views)
        self.resident.count_visits(culled.ids, culled.vis)
        stats = StepStats(visible_rows=int(culled.ids.numel()))
        everything = self.resident.count == len(self.key)  # no host path this step
        batch = _Batch(
            views, loss_fn, observe, sh_degree, background, step, width, stats,
            culled.ids, torch.empty(0), settled, catch_up,
        )  # fmt: skip
        read = None
        if not everything:
            # (the walk needs the host rows alone; its rows are split again after it)
            split = self.resident.split(culled, per_view=self.reach is None)
            stats.host_rows = split.host.ids.numel()
            read = self._read(batch, culled, views, split)
            if read is not None:
                split = self.resident.split(read.culled)
                batch.rows = read.culled.ids
                batch.walked = True
            elif self.reach is not None:  # the walk did not fit: every culled row is read
                split = self.resident.split(culled)
            host_rows = split.host.ids.numel()
            capacity = max(self.capacity if self.capacity is not None else host_rows, 1)
            survey = overlap_and_uses(split.host.vis)  # the plan's one sync: who needs pieces
            # A view's render workspace grows with every row it renders, resident ones too.
            rendered = culled if read is None else read.culled
            per_view = survey[1] if split.at is None else rendered.vis.sum(dim=1).tolist()
            big = [i for i, rows in enumerate(per_view) if rows > capacity]
        self._take_rows(batch, batch.rows)
        if everything:
            self._train_resident(batch, culled)
        elif big:
            self._train_in_pieces(batch, per_view, big, capacity, read)
        else:
            rendered, drawn = (culled, None) if read is None else (read.culled, read.drawn)
            self._train_group(
                batch, views, range(len(views)), rendered, capacity, survey, split, drawn=drawn
            )
        self.flusher.flush_deferred(width, step)
        self.key.step_sparse(batch.rows, batch.key_grads, step, batch.key_cuts)
        self.resident.step(step, width)
        self._mark_stepping(batch, host_path=not everything)
        self.step = step  # the CPU Adam of this batch finishes while the next batch culls
        self.last_stats = batch.stats
        if self.step_memory is not None:
            measured = self.step_memory.finish()
            if measured is not None:
                self.step_memory = None
                self._resident_from_measured(*measured)

    def _take_rows(self, batch: _Batch, rows: Tensor) -> None:
        """Make ``rows`` (ascending) the batch's: their key gradients, zeroed, and where the key
        Adam's chunks begin in them, located now so the end of the step need not wait."""
        batch.rows = rows
        batch.key_grads = torch.zeros(rows.numel(), self.key.width, device=self.device)
        batch.key_cuts = self.key.locate(rows)

    def _resident_from_measured(self, held: int, step_most: int) -> None:
        """Let the resident set take what the first steps left of the GPU budget, when that is
        more than the plan gave it (the set is chosen again before the next step).

        Not when that would hold every row: the steps measured rendered their views through
        the row cache, in pieces where a view reads more rows than it holds, but with every
        row resident a view is rendered whole, which only the plan bounds."""
        assert isinstance(self.resident_limit, ResidentBudget)
        rows = self.key.table.capacity
        width = self.host.width
        measured = self.resident_limit.measured(held - self.resident.nbytes, step_most, rows, width)
        planned = self.resident_limit.slots(rows, width)
        slots = measured.slots(rows, width)
        taken = planned < slots < len(self.key)
        log.info(
            "the first %d steps held %.2f GiB of GPU memory and took at most %.2f GiB more: "
            "room for %.2fM resident rows (the plan's worst case: %.2fM)%s",
            MEASURED_STEPS, held / GIB, step_most / GIB, slots / 1e6, planned / 1e6,
            "" if taken or slots <= planned else "; every row would be, so the plan's stands",
        )  # fmt: skip
        if taken:
            self._measured_limit = measured
            self.resident.stale = True

    def _mark_stepping(self, batch: _Batch, host_path: bool) -> None:
        """Note the rows the CPU Adam of ``batch`` may write (none without a host path),
        beside those of the batches before while their Adam is not known to be done.

        ``index_fill_``: a Python scalar assigned through an index is first copied to the
        GPU, which waits for the stream (11-17 ms at the end of every (e) step, the GPU idle
        until the next step's cull)."""
        if batch.settled.is_set():
            self._stepping = None
        if not host_path:
            return
        if self._stepping is None:
            self._stepping = torch.zeros(len(self.key), dtype=torch.bool, device=self.device)
        self._stepping.index_fill_(0, batch.rows, True)

    def _train_group(
        self,
        batch: _Batch,
        units: Sequence[View],
        owner: Sequence[int],
        culled: CullResult,
        capacity: int,
        survey: tuple[Tensor, list[int]] | None = None,
        split: Split | None = None,
        keep: Tensor | None = None,
        to_batch: Tensor | None = None,
        drawn: Sequence[Tensor | None] | None = None,
    ) -> None:
        """Plan ``units`` (views, or pieces of ``batch.views[owner[k]]``) through the cache and
        render each with gradients. ``to_batch``: where ``culled``'s rows are in ``batch.rows``,
        when those are not the same; ``keep``: rows other groups use too; ``survey`` and
        ``split``: of ``culled``, when already made; ``drawn``: per unit, rows it draws but
        does not read (``culled`` holds the rows read, see :mod:`clm.offload.read_rows`)."""
        step, width = batch.step, batch.width
        split = split if split is not None else self.resident.split(culled)
        host, at = split.host, split.at
        host_to_batch = at if to_batch is None else (to_batch if at is None else to_batch[at])
        plan = plan_batch(
            host.ids,
            host.vis,
            capacity,
            survey=survey,
            keep=keep if keep is None or at is None else keep[at],
        )
        self._ensure_cache(plan.slots_needed)
        stats = batch.stats
        stats.read_rows += host.ids.numel()
        stats.cache_lookups += plan.uses
        stats.cache_hits += plan.uses - plan.loads
        stats.bytes_to_gpu += plan.loads * width * 4
        if self.copy_stream is not None:  # the loads read the plan, made on this stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        cache_grad = self.cache_grad[:, :width]
        # Rows the walk found read nearly all have a gradient: copying them whole holds no SMs,
        # where leaving out the few without would (GradientFlush).
        compact = not batch.walked
        loaded: list[torch.cuda.Event | None] = []
        flushed: list[torch.cuda.Event | None] = []
        for k, mb in enumerate(plan.micro):
            # Issue loads up to one view ahead, each once the flush it waits for is queued
            # (where a stretch of views starts, that is this view's own flush: no overlap there).
            while (
                len(loaded) <= k + 1
                and len(loaded) < len(plan.micro)
                and plan.micro[len(loaded)].load_after < len(flushed)
            ):
                loaded.append(self._load(batch, plan, len(loaded), flushed))
            if loaded[k] is not None:
                torch.cuda.current_stream(self.device).wait_event(loaded[k])
            gids = mb.render_ids
            pos = mb.render_pos if host_to_batch is None else host_to_batch[mb.render_pos]
            rows = [Source(self.cache_param, mb.render_slots, cache_grad, mb.render_slots)]
            if split.resident is not None:  # then the view's resident rows
                mine = split.resident[mb.view]
                ids = culled.ids[mine]
                slots = self.resident.slots(ids)
                gids = torch.cat([gids, ids])
                pos = torch.cat([pos, mine if to_batch is None else to_batch[mine]])
                grads = self.resident.grad[:, :width]
                rows.append(Source(self.resident.param, slots, grads, slots))
            # Gradients go into key_grads, the cache and the resident rows during backward.
            params = self.inputs.gather(
                (Source(self.key.param, gids, batch.key_grads, pos), rows), batch.sh_degree
            )
            unread = drawn[mb.view] if drawn is not None else None
            self._render_unit(batch, units[mb.view], owner[mb.view], params, gids, unread)
            sent = self.flusher.flush(
                cache_grad, mb.flush_ids, mb.flush_slots, width, step, compact
            )
            sent += self.flusher.defer(cache_grad, mb.defer_ids, mb.defer_slots, width, compact)
            stats.bytes_to_host += sent
            flushed.append(self._event())

    def _train_resident(self, batch: _Batch, culled: CullResult) -> None:
        """The batch when every row is resident: each view renders its culled rows straight
        from the key table and the resident rows, as ``--offload none`` does."""
        grads = self.resident.grad[:, : batch.width]
        for i, view in enumerate(batch.views):
            pos = torch.nonzero(culled.vis[i]).squeeze(1)
            ids = culled.ids[pos]
            slots = self.resident.slots(ids)
            params = self.inputs.gather(
                (
                    Source(self.key.param, ids, batch.key_grads, pos),
                    Source(self.resident.param, slots, grads, slots),
                ),
                batch.sh_degree,
            )
            self._render_unit(batch, view, i, params, ids)

    def _render_unit(
        self,
        batch: _Batch,
        unit: View,
        i: int,
        params: Mapping[str, Tensor],
        rows: Tensor,
        drawn: Tensor | None = None,
    ) -> None:
        """Render view ``i`` of the batch, or a piece of it, from ``rows`` and backpropagate
        (``drawn``: rows a whole view draws without reading them, left out of the render)."""
        if isinstance(unit, Piece):
            grads = batch.in_pieces[i]
            if rows.numel() == 0 and not grads.paints:  # background: nothing to backpropagate
                return
            out = self.render_fn(params, unit.full, batch.sh_degree, batch.background)
            grads.backward(unit, out, rows)
            return
        out = self.render_fn(params, unit, batch.sh_degree, batch.background)
        batch.loss_fn(i, out).backward()
        batch.observe(*with_drawn(rows[out.ids], out, drawn), unit)

    def _read(
        self, batch: _Batch, culled: CullResult, units: Sequence[View], split: Split
    ) -> ReadCull | None:
        """The rows of ``culled`` (split by residency in ``split``) that the renders of
        ``units`` read (None: every row, as the renderer declares no reach, or its walk did
        not fit the GPU budget)."""
        if self.reach is None:
            return None
        try:
            return self._walk(batch, culled, units, split)
        except torch.cuda.OutOfMemoryError:
            # The walk costs GPU memory per row a view culls in, which the planner does not set
            # aside (a render's workspace is free then, and usually holds it): this batch reads
            # every culled-in row, as the plan allows for.
            if not self._walk_refused:
                log.warning("the GPU budget leaves no room to walk a view: rows are read whole")
            self._walk_refused += 1
            return None

    def _walk(
        self, batch: _Batch, culled: CullResult, units: Sequence[View], split: Split
    ) -> ReadCull:
        """:meth:`_read`'s walk. Host attributes the walk reads are gathered, caught up, for
        the host rows (once the CPU Adam of the batches before has written them), and taken
        from the resident rows for the others."""
        assert self.reach is not None
        segments = self._reach_segments
        values = None
        if segments:
            width = segments[-1].end
            values = torch.empty(culled.ids.numel(), width, device=self.device)
            at = split.at  # the host rows' positions (None: every row is a host row)
            host = culled.ids if at is None else split.host.ids
            if at is None:
                at = torch.arange(culled.ids.numel(), device=self.device)

            def gather(rows: Tensor, to: Tensor) -> None:
                self.gather.gather(rows, to, width, values, catch_up=batch.catch_up)

            self._gather_settled(batch, host, at, gather)
            batch.stats.bytes_to_gpu += at.numel() * width * 4
            if split.at is not None:
                self.resident.patch(culled.ids, values, width)

        def inputs(pos: Tensor) -> dict[str, Tensor]:
            params = unpack_rows(self.key.param[culled.ids[pos]], self.key.layout)
            if values is not None:
                params.update(unpack_rows(values[pos], segments))
            return params

        views = [unit.full if isinstance(unit, Piece) else unit for unit in units]
        return read_cull(self.reach, culled, views, inputs)

    def _gather_settled(
        self, batch: _Batch, host: Tensor, at: Tensor, gather: Callable[[Tensor, Tensor], None]
    ) -> None:
        """``gather(host, at)`` in two parts: host rows the CPU Adam of the batches before may
        still write once it is done, the others first, while it runs (nothing writes them), so
        the wait overlaps their gather. Finding the parts syncs the current stream."""
        busy = self._stepping
        if busy is not None and not batch.settled.is_set():
            late = busy[host]
            early = torch.nonzero(~late).squeeze(1)
            gather(host[early], at[early])
            late = torch.nonzero(late).squeeze(1)
            host, at = host[late], at[late]
        self._settle(batch)
        gather(host, at)

    def _cull(self, views: Sequence[View]) -> CullResult:
        keys = self.key.views()
        return self.culler.cull(*self.spec.cull_inputs(keys), views)

    def _settle(self, batch: _Batch) -> None:
        """Wait for the CPU Adam of the batches before ``batch`` (loads read what it writes)."""
        if not batch.settled.is_set():
            self._waited_seconds += self.flusher.worker.wait(batch.settled)

    def _drain(self) -> None:
        """Wait for all background CPU work, counting the seconds waited."""
        self._waited_seconds += self.flusher.worker.drain()
        self._stepping = None  # (rows may be renumbered next)

    def _load(
        self,
        batch: _Batch,
        plan: BatchPlan,
        k: int,
        flushed: Sequence[torch.cuda.Event | None] = (),
    ) -> torch.cuda.Event | None:
        """Gather micro-batch k's new rows on the copy stream, each once the CPU Adam of the
        batches before has written it; returns its completion event.

        Loads queued before the first render (nothing on the copy stream waits for a flush
        then, so splitting their rows costs no wait) gather the rows that Adam does not write
        while it runs; later ones wait for it whole."""
        mb = plan.micro[k]

        def gather(rows: Tensor, slots: Tensor) -> None:
            self.gather.gather(
                rows,
                slots,
                batch.width,
                self.cache_param,
                self.cache_grad,
                self.copy_stream,
                batch.catch_up,
            )

        with on_stream(self.copy_stream):
            if not flushed:
                self._gather_settled(batch, mb.load_ids, mb.load_slots, gather)
                return self._event(self.copy_stream)
            self._settle(batch)
            if mb.load_after >= 0 and self.copy_stream is not None:
                after = flushed[mb.load_after]
                if after is not None:
                    self.copy_stream.wait_event(after)
            gather(mb.load_ids, mb.load_slots)
            return self._event(self.copy_stream)

    def close(self) -> None:
        self.flusher.close()
