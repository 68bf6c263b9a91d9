"""``--offload clm``: key attributes on the GPU, every other attribute in pinned host memory.

One step, for a batch of views (see DESIGN.md):

1. cull all views against the key attributes (no PCIe traffic) and plan the batch through the
   row cache (:mod:`clm.offload.plan`);
2. a background thread brings the rows each view will load up to date (host rows are updated
   lazily; dense Adam would have moved a row that went unseen, and the render must see that),
   starting as soon as the planner knows them, ahead of the gathers; most were already caught
   up during the previous step (:meth:`OffloadEngine.expect`);
3. for each view in the planned order: gather the rows it is the first to use from pinned
   memory into cache slots (a kernel on the copy stream, one view ahead of rendering), render,
   backpropagate, accumulate gradients in the cache, and flush the rows whose last use this was:
   their gradients go to pinned staging on a second stream and the CPU Adam thread updates them
   while the GPU renders the next views;
4. Adam for the key attributes on the GPU; the next batch's culling overlaps the CPU Adam tail.

A view that sees more rows than the cache holds is rendered in pieces, each planned like a view,
with the same gradients as the whole image (:mod:`clm.offload.pieces`); a batch without one takes
no extra step or host sync for it. Only the coefficients of the active SH degree move. On a
machine without CUDA the same code runs with the torch twins of the kernels and no streams.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from clm.engine.base import (
    STREAM_ROWS,
    Engine,
    LossFn,
    ObserveFn,
    RowChunk,
    RowSource,
    StepStats,
)
from clm.model.spec import active_row_width, unpack_rows
from clm.model.table import Compaction
from clm.offload.culling import MAX_CAMERAS, Culler, CullResult
from clm.offload.lazy_rows import DeviceRows, HostRows
from clm.offload.pieces import Canvas, ImageGrad, Piece, PieceCuller, cut_views, group_units
from clm.offload.plan import BatchPlan, overlap_and_uses, plan_batch
from clm.offload.row_inputs import RowInputs, Source
from clm.offload.transfer import RowGather
from clm.offload.worker import BackgroundQueue, StagingRing, wait_for
from clm.optim.lazy_adam import AdamConfig
from clm.render.base import RenderOutput, View

STAGING_ROWS = 1 << 20  # gradient rows the pinned staging ring holds


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
    in_pieces: dict[int, ImageGrad] = field(default_factory=dict)  # views rendered in pieces
    ahead: bool = True  # the next batch's catch-up is still to be started


@contextlib.contextmanager
def _on(stream: torch.cuda.Stream | None) -> Iterator[None]:
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


class OffloadEngine(Engine):
    def __init__(
        self,
        params: Mapping[str, Tensor],
        *,
        cache_rows: int | None,
        staging_rows: int = STAGING_ROWS,
        max_host_bytes: int | None = None,
        chunk_shift: int = 20,
        cpu_threads: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        config = AdamConfig(self.adam.betas, self.adam.eps)
        cuda = self.device.type == "cuda"
        self.key = DeviceRows(self.spec.key, params, self.lrs, config, self.device)
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
        self.gather = RowGather(self.host.store, self.device)
        self.culler = PieceCuller(self.device)
        self.inputs = RowInputs([self.key.layout, self.host.layout])
        self.capacity = cache_rows
        width = self.host.width
        self.cache_param = torch.empty(0, width, device=self.device)
        self.cache_grad = torch.empty(0, width, device=self.device)
        self.staging = StagingRing(staging_rows, width, pinned=cuda)
        self.worker = BackgroundQueue("clm-cpu-adam")  # updates rows whose gradients arrived
        self.prefetch = BackgroundQueue("clm-catch-up")  # readies rows before their gather
        self.exposed_seconds = 0.0  # main thread waiting for CPU work, over the run
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.d2h_stream = torch.cuda.Stream(self.device) if cuda else None
        self._deferred: list[tuple[Tensor, Tensor]] = []
        # Rows the next batch will load, caught up during this step (see _catch_up_ahead).
        self.ahead_culler = Culler(self.device, chunk=1 << 22)
        self.ahead_stream = torch.cuda.Stream(self.device) if cuda else None
        self._upcoming: list[View] = []
        self._ahead_read: tuple[threading.Event, list[torch.cuda.Event]] | None = None

    # ---- basic facts ----------------------------------------------------------------------

    @property
    def num_gaussians(self) -> int:
        return len(self.key)

    def key_param(self, name: str) -> Tensor:
        return self.key.views()[name]

    def attribute_rows(self, name: str, ids: Tensor) -> Tensor:
        if any(a.name == name for a in self.spec.key):
            return self.key.views()[name][ids.to(self.device)]
        self._drain()
        rows = ids.cpu()
        self.host.catch_up(rows, self.step)
        packed = self.host.store.gather_params(rows)
        return unpack_rows(packed, self.host.layout)[name].to(self.device)

    def _ensure_cache(self, rows: int) -> None:
        if self.cache_param.shape[0] >= rows:
            return
        grown = max(rows, int(self.cache_param.shape[0] * 1.25))
        if self.capacity is not None:
            grown = min(self.capacity, grown)
        self.cache_param = torch.empty(grown, self.host.width, device=self.device)
        self.cache_grad = torch.zeros(grown, self.host.width, device=self.device)

    def _event(self, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

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
        keys = self.key.views()
        # Rows of this batch must have their previous update before being caught up, gathered.
        self._drain()
        self.host.advance_to(step - 1)
        culled = self.culler.cull(keys["means"], keys["scales"], keys["opacities"], views)
        capacity = max(self.capacity if self.capacity is not None else culled.ids.numel(), 1)
        survey = overlap_and_uses(culled.vis)  # the plan's one sync: it says who needs pieces
        big = [i for i, rows in enumerate(survey[1]) if rows > capacity]
        batch = _Batch(
            views,
            loss_fn,
            observe,
            sh_degree,
            background,
            step,
            width,
            StepStats(visible_rows=int(culled.ids.numel())),
            culled.ids,
            torch.zeros(culled.ids.numel(), self.key.width, device=self.device),
        )
        if big:
            self._train_in_pieces(batch, survey[1], big, capacity)
        else:
            self._train_group(batch, views, range(len(views)), culled, capacity, survey)

        if self._deferred:
            self._flush_deferred(width, step)
        self._after_ahead_reads()
        self.key.step_sparse(batch.rows, batch.key_grads, step)
        self.step = step  # the CPU Adam of this batch finishes while the next batch culls
        self.last_stats = batch.stats

    def _train_group(
        self,
        batch: _Batch,
        units: Sequence[View],
        owner: Sequence[int],
        culled: CullResult,
        capacity: int,
        survey: tuple[Tensor, list[int]] | None = None,
        keep: Tensor | None = None,
        to_batch: Tensor | None = None,
    ) -> None:
        """Plan ``units`` (views, or pieces of ``batch.views[owner[k]]``) through the cache and
        render each with gradients. ``to_batch``: where ``culled``'s rows are in ``batch.rows``,
        when those are not the same; ``keep``: rows other groups use too."""
        step, width = batch.step, batch.width
        ready: list[threading.Event] = []  # the catch-up starts while the plan is being built
        plan = plan_batch(
            culled.ids,
            culled.vis,
            capacity,
            lambda rows, counts: ready.extend(self._catch_up_loads(rows, counts, step - 1, width)),
            survey=survey,
            keep=keep,
        )
        self._ensure_cache(plan.slots_needed)
        stats = batch.stats
        stats.cache_lookups += plan.uses
        stats.cache_hits += plan.uses - plan.loads
        stats.bytes_to_gpu += plan.loads * width * 4
        if batch.ahead:
            self._catch_up_ahead(batch.views, step, width)
            batch.ahead = False
        if self.copy_stream is not None:  # the loads read the plan, made on this stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        cache_grad = self.cache_grad[:, :width]
        loaded: list[torch.cuda.Event | None] = []
        flushed: list[torch.cuda.Event | None] = []
        for k, mb in enumerate(plan.micro):
            # Issue loads up to one view ahead, each once the flush it waits for is queued
            # (at a segment boundary that is this view's own flush: no overlap there).
            while (
                len(loaded) <= k + 1
                and len(loaded) < len(plan.micro)
                and plan.micro[len(loaded)].load_after < len(flushed)
            ):
                loaded.append(self._load(plan, len(loaded), width, ready, flushed))
            if loaded[k] is not None:
                torch.cuda.current_stream(self.device).wait_event(loaded[k])
            gids = mb.render_ids
            pos = mb.render_pos if to_batch is None else to_batch[mb.render_pos]
            # Gradients go into key_grads and the cache during backward (see row_inputs).
            params = self.inputs.gather(
                (
                    Source(self.key.param, gids, batch.key_grads, pos),
                    Source(self.cache_param, mb.render_slots, cache_grad, mb.render_slots),
                ),
                batch.sh_degree,
            )
            self._render_unit(batch, units[mb.view], owner[mb.view], params, gids)
            stats.bytes_to_host += self._flush(mb.flush_ids, mb.flush_slots, width, step)
            stats.bytes_to_host += self._defer(mb.defer_ids, mb.defer_slots, width)
            flushed.append(self._event())

    def _render_unit(
        self, batch: _Batch, unit: View, i: int, params: Mapping[str, Tensor], rows: Tensor
    ) -> None:
        """Render view ``i`` of the batch, or a piece of it, from ``rows`` and backpropagate."""
        if isinstance(unit, Piece):
            if rows.numel() == 0:  # only background there: nothing to backpropagate
                return
            image_grad = batch.in_pieces[i]
            out = self.render_fn(params, unit.full, batch.sh_degree, batch.background)
            loss = image_grad.loss(unit, out)
            if loss is not None:
                loss.backward()
            image_grad.record(out, rows)
            return
        out = self.render_fn(params, unit, batch.sh_degree, batch.background)
        batch.loss_fn(i, out).backward()
        batch.observe(rows[out.ids], out, unit)

    def _train_in_pieces(
        self, batch: _Batch, per_view: Sequence[int], big: Sequence[int], capacity: int
    ) -> None:
        """The batch with views ``big`` (too large for the cache) cut into pieces.

        Pass 1 stitches each such view from its pieces, without gradients, and backpropagates
        its loss to the image (:mod:`clm.offload.pieces`). Pass 2 plans pieces and whole views
        through the cache like views, in groups of bounded size; rows used by several groups
        have their gradients deferred, so Adam still sees each row's batch gradient once.
        """
        wanted = [batch.views[i] for i in big]
        cuts = dict(
            zip(big, cut_views(self.culler, self.key.views(), wanted, capacity), strict=True)
        )
        units: list[View] = []
        owner: list[int] = []
        counts: list[int] = []
        for i, view in enumerate(batch.views):
            parts = cuts.get(i, [(view, per_view[i])])
            units += [unit for unit, _ in parts]
            owner += [i] * len(parts)
            counts += [n for _, n in parts]
        groups = group_units(counts)
        canvases = {i: Canvas() for i in big}
        rows: list[Tensor] = []  # each group's
        for group in groups:
            part = self._cull([units[k] for k in group])
            rows.append(part.ids)
            batch.stats.bytes_to_gpu += self._paint(
                canvases, units, owner, group, part, batch.sh_degree, batch.background, batch.width
            )
        for i, canvas in canvases.items():
            batch.in_pieces[i] = ImageGrad(canvas, lambda out, i=i: batch.loss_fn(i, out))
        if len(groups) == 1:
            batch.rows = part.ids
            batch.key_grads = torch.zeros(batch.rows.numel(), self.key.width, device=self.device)
            self._train_group(batch, units, owner, part, capacity)
        else:
            del part  # culled again, group by group: all their visibility at once could be large
            self._train_groups(batch, units, owner, groups, rows, capacity)
        for i, image_grad in batch.in_pieces.items():
            batch.observe(*image_grad.observed(), batch.views[i])

    def _train_groups(
        self,
        batch: _Batch,
        units: Sequence[View],
        owner: Sequence[int],
        groups: Sequence[Sequence[int]],
        rows: Sequence[Tensor],
        capacity: int,
    ) -> None:
        """Train ``groups`` of ``units`` one after the other (``rows``: what each culls to)."""
        batch.rows = torch.unique(torch.cat(list(rows)))
        batch.key_grads = torch.zeros(batch.rows.numel(), self.key.width, device=self.device)
        at = [torch.searchsorted(batch.rows, ids) for ids in rows]
        uses = torch.zeros(batch.rows.numel(), dtype=torch.int32, device=self.device)
        for a in at:
            uses.index_add_(0, a, torch.ones_like(a, dtype=torch.int32))
        for group, a in zip(groups, at, strict=True):
            part = self._cull([units[k] for k in group])
            members, owners = [units[k] for k in group], [owner[k] for k in group]
            self._train_group(batch, members, owners, part, capacity, keep=uses[a] > 1, to_batch=a)

    def _cull(self, views: Sequence[View]) -> CullResult:
        keys = self.key.views()
        return self.culler.cull(keys["means"], keys["scales"], keys["opacities"], views)

    def _paint(
        self,
        canvases: Mapping[int, Canvas],
        units: Sequence[View],
        owner: Sequence[int],
        group: Sequence[int],
        culled: CullResult,
        sh_degree: int,
        background: Tensor,
        width: int,
    ) -> int:
        """Render the pieces among ``units[group]`` (``culled`` together) without gradients
        onto their views' canvases; returns the bytes gathered."""
        moved = 0
        for j, k in enumerate(group):
            piece = units[k]
            if isinstance(piece, Piece):
                rows = culled.ids[culled.vis[j]]
                out = self._render_rows(rows, piece.full, sh_degree, background, width)
                canvases[owner[k]].paint(piece, out, rows)
                moved += rows.numel() * width * 4
        return moved

    @torch.no_grad()
    def _render_rows(
        self, rows: Tensor, view: View, sh_degree: int, background: Tensor, width: int
    ) -> RenderOutput:
        """Render ``view`` from ``rows`` alone, without gradients, once they are caught up to
        ``self.step`` (their leading ``width`` columns)."""
        self.host.catch_up(rows.cpu(), self.step, width)
        values = torch.empty(rows.numel(), width, device=self.device)
        self.gather.gather(rows, torch.arange(rows.numel(), device=self.device), width, values)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        params = unpack_rows(self.key.param[rows], self.key.layout)
        params.update(unpack_rows(values, self.host.layout, sh_degree))
        return self.render_fn(params, view, sh_degree, background)

    def _drain(self) -> float:
        """Wait for all background CPU work; returns (and accumulates) the seconds waited."""
        t0 = time.perf_counter()
        self.prefetch.drain()
        self.worker.drain()
        waited = time.perf_counter() - t0
        self.exposed_seconds += waited
        return waited

    def expect(self, views: Sequence[View]) -> None:
        self._upcoming = list(views)

    def _catch_up_ahead(self, views: Sequence[View], step: int, width: int) -> None:
        """Catch up, while this step runs, the rows the next batch (:meth:`expect`) will load.

        The next views are culled against the key attributes as they are now; rows this batch
        sees are left out (their Adam step comes from this batch's gradients). The others skip
        this step, so they are brought up to ``step`` on copies of the skip tables. A row the
        guess misses is caught up before its load as usual; one it wrongly includes was only
        brought forward: the result is the same either way.
        """
        upcoming, self._upcoming = self._upcoming, []
        if not upcoming or len(upcoming) + len(views) > MAX_CAMERAS:
            return
        keys = self.key.views()
        args = (keys["means"], keys["scales"], keys["opacities"], upcoming, views)
        segments = self.host.segments_ahead(step)
        if self.ahead_stream is None:  # on the CPU: cull here, deterministically
            rows = self.ahead_culler.cull_new(*args)
            self.prefetch.submit(lambda: self.host.catch_up(rows, step, width, segments))
            return
        # On the GPU the culling runs on its own stream, from the catch-up thread; the key Adam
        # of this step waits until it has read the key attributes.
        self.ahead_stream.wait_stream(torch.cuda.current_stream(self.device))
        launched, read = threading.Event(), []
        self._ahead_read = (launched, read)

        def job() -> None:
            with torch.cuda.stream(self.ahead_stream):
                try:
                    fresh = self.ahead_culler.cull_new(*args)
                    read.append(self._event(self.ahead_stream))
                finally:
                    launched.set()
                rows = fresh.cpu()
            self.host.catch_up(rows, step, width, segments)

        self.prefetch.submit(job)

    def _after_ahead_reads(self) -> None:
        """Order what follows on the compute stream after the ahead culling's reads."""
        if self._ahead_read is None:
            return
        launched, read = self._ahead_read
        self._ahead_read = None
        while not launched.wait(timeout=0.1):
            self.prefetch.raise_error()
        if read:
            torch.cuda.current_stream(self.device).wait_event(read[0])

    def _catch_up_loads(
        self, rows: Tensor, counts: Sequence[int], upto: int, width: int
    ) -> list[threading.Event]:
        """Queue the catch-up of each micro-batch's load rows (``rows`` split by ``counts``);
        returns one event per micro-batch."""
        done = [threading.Event() for _ in counts]
        start = 0
        for k, n in enumerate(counts):

            def job(lo=start, hi=start + n, event=done[k]) -> None:
                if hi > lo:
                    self.host.catch_up(rows[lo:hi], upto, width)
                event.set()

            self.prefetch.submit(job)
            start += n
        return done

    def _load(
        self,
        plan: BatchPlan,
        k: int,
        width: int,
        ready: Sequence[threading.Event],
        flushed: Sequence[torch.cuda.Event | None] = (),
    ) -> torch.cuda.Event | None:
        """Gather micro-batch k's new rows on the copy stream; returns its completion event."""
        mb = plan.micro[k]
        t0 = time.perf_counter()
        while not ready[k].wait(timeout=0.1):
            self.prefetch.raise_error()
        self.exposed_seconds += time.perf_counter() - t0
        with _on(self.copy_stream):
            if mb.load_after >= 0 and self.copy_stream is not None:
                after = flushed[mb.load_after]
                if after is not None:
                    self.copy_stream.wait_event(after)
            self.gather.gather(
                mb.load_ids,
                mb.load_slots,
                width,
                self.cache_param,
                self.cache_grad,
                self.copy_stream,
            )
            return self._event(self.copy_stream)

    def _download(self, grads: Tensor, rows: Tensor) -> tuple[int, torch.cuda.Event | None]:
        """Copy gradient rows into the staging ring on the D2H stream."""
        n = rows.numel()
        start = self.staging.acquire(n)
        ready = self._event()
        with _on(self.d2h_stream):
            if self.d2h_stream is not None and ready is not None:
                self.d2h_stream.wait_event(ready)
                # Made on the compute stream, read on this one: not to be reused before.
                grads.record_stream(self.d2h_stream)
                rows.record_stream(self.d2h_stream)
            self.staging.grads_view(start, n, grads.shape[1]).copy_(grads, non_blocking=True)
            self.staging.rows[start : start + n].copy_(rows, non_blocking=True)
            done = self._event(self.d2h_stream)
        return start, done

    def _flush(self, ids: Tensor, slots: Tensor, width: int, step: int) -> int:
        """Final gradients of rows ``ids``: to the host, then the CPU Adam (in the background)."""
        total = 0
        part = self.staging.capacity // 2
        for lo in range(0, ids.numel(), part):
            rows, s = ids[lo : lo + part], slots[lo : lo + part]
            grads = self.cache_grad[s, :width]
            start, done = self._download(grads, rows)
            n = rows.numel()

            def job(start=start, n=n, done=done) -> None:
                wait_for(done)
                rows = self.staging.rows[start : start + n]
                grads = self.staging.grads_view(start, n, width)
                self.host.step_rows(rows, grads, width, step)
                self.staging.release()

            self.worker.submit(job)
            total += n * width * 4
        return total

    def _defer(self, ids: Tensor, slots: Tensor, width: int) -> int:
        """Partial gradients of rows used in several segments: kept until the batch ends."""
        if ids.numel() == 0:
            return 0
        grads = self.cache_grad[slots, :width].cpu()
        self._deferred.append((ids.cpu(), grads))
        return ids.numel() * width * 4

    def _flush_deferred(self, width: int, step: int) -> None:
        rows = torch.cat([r for r, _ in self._deferred])
        grads = torch.cat([g for _, g in self._deferred])
        self._deferred.clear()
        unique, inverse = torch.unique(rows, return_inverse=True)
        summed = torch.zeros(unique.numel(), width).index_add_(0, inverse, grads)
        self.worker.submit(lambda: self.host.step_rows(unique, summed, width, step))

    # ---- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def render(self, view: View, sh_degree: int, background: Tensor) -> RenderOutput:
        """A view that sees more rows than the cache holds is rendered in pieces and stitched,
        so evaluation never needs more GPU rows than training."""
        self._drain()
        ids = self._cull([view]).ids
        width = self.host.width
        if self.capacity is None or ids.numel() <= self.capacity:
            out = self._render_rows(ids, view, sh_degree, background, width)
            out.ids = ids[out.ids]
            return out
        pieces = cut_views(self.culler, self.key.views(), [view], self.capacity)[0]
        units = [piece for piece, _ in pieces]
        canvas = Canvas()
        for group in group_units([n for _, n in pieces]):
            culled = self._cull([units[k] for k in group])
            self._paint(
                {0: canvas}, units, [0] * len(units), group, culled, sh_degree, background, width
            )
        return canvas.output()

    # ---- density control ------------------------------------------------------------------

    def append(self, src: Tensor, overrides: Mapping[str, Tensor]) -> None:
        self._drain()
        src = src.to(self.device)
        src_cpu = src.cpu()
        self.host.catch_up(torch.unique(src_cpu), self.step)
        # Host rows first: if host memory runs out, nothing has been added anywhere.
        self.host.append_copies(src_cpu, self.step)
        keys = self.key.views()
        self.key.append({n: overrides[n] if n in overrides else t[src] for n, t in keys.items()})

    def reserve(self, rows: int) -> None:
        self.key.table.reserve(rows)

    def extend(self, params: Mapping[str, Tensor]) -> None:
        self._drain()
        self.host.append({a.name: params[a.name].cpu() for a in self.spec.host}, self.step)
        self.key.append({a.name: params[a.name] for a in self.spec.key})

    def compact(self, plan: Compaction) -> None:
        self._drain()
        self.key.compact(plan)
        self.host.compact(Compaction(plan.holes.cpu(), plan.movers.cpu(), plan.new_len))

    def reset_opacity(self, max_logit: float) -> None:
        self.key.views()["opacities"].clamp_(max=max_logit)
        self.key.zero_moments("opacities")

    # ---- checkpoints ----------------------------------------------------------------------

    def state_chunks(self, rows: int = STREAM_ROWS) -> Iterator[RowChunk]:
        self._drain()
        for start, stop, host in self.host.state_chunks(self.step, rows):
            key = self.key.state_chunk(start, stop)
            yield RowChunk(*({**k, **h} for k, h in zip(key, host, strict=True)))

    def load_rows(self, source: RowSource) -> None:
        self._drain()
        self.key.clear(max(self.key.table.capacity, source.count))
        self.host.clear()
        self.host.store.reserve(source.count)
        key_names = [a.name for a in self.spec.key]
        host_names = [a.name for a in self.spec.host]
        for chunk in source.chunks:
            state = (chunk.params, *chunk.moments())
            self.key.append_state(*({n: d[n] for n in key_names} for d in state))
            self.host.append_state(*({n: d[n] for n in host_names} for d in state), source.step)
        self.host.advance_to(source.step)
        self.step = source.step

    def close(self) -> None:
        self.prefetch.close()
        self.worker.close()
