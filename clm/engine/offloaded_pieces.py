"""The offload engine's renders of views larger than its row cache, and without gradients.

A training view larger than the cache is rendered in pieces, each planned like a view, with
the same gradients as the whole image (:mod:`clm.offload.pieces`): in one pass when the loss is
local (:class:`clm.engine.base.LocalLoss`), else in two. The first of two passes and evaluation
render from rows gathered on the spot (:meth:`InPieces._render_rows`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clm.engine.base import LocalLoss
from clm.errors import ClmError
from clm.model.spec import unpack_rows
from clm.offload.culling import CullResult
from clm.offload.piece_grads import Canvas, CropGrad, ImageGrad
from clm.offload.pieces import Piece, cut_views, group_units, margin_for
from clm.offload.read_rows import ReadCull
from clm.render.base import RenderOutput, View

if TYPE_CHECKING:
    from clm.engine.offloaded import _Batch


class InPieces:
    """Mixed into :class:`clm.engine.offloaded.OffloadEngine`: a batch with views larger than
    the cache, trained in one pass or two (see :meth:`_train_in_pieces`), and evaluation."""

    def _train_in_pieces(
        self,
        batch: _Batch,
        per_view: Sequence[int],
        big: Sequence[int],
        capacity: int,
        read: ReadCull | None = None,
    ) -> None:
        """The batch with views ``big`` (too large for the cache) cut into pieces; ``read``:
        the rows each view reads, which alone its pieces cull and render (None: all rows).

        With a :class:`LocalLoss`, pieces are culled with a margin of the loss's reach and
        each backpropagates its own region's loss: one pass (:class:`CropGrad`). Otherwise
        pass 1 stitches each such view from its pieces, without gradients, and backpropagates
        its loss to the image (:class:`ImageGrad`). Either way the pieces and whole views are
        then planned through the cache like views, in groups of bounded size; rows used by
        several groups have their gradients deferred, so Adam still sees each row's batch
        gradient once.
        """
        local = batch.loss_fn if isinstance(batch.loss_fn, LocalLoss) else None
        cull_inputs = self.spec.cull_inputs(self.key.views())

        def cut_big(margin: int = 0) -> list[list[tuple[Piece, int]]]:
            if read is None:
                wanted = [batch.views[i] for i in big]
                return cut_views(self.culler, cull_inputs, wanted, capacity, margin)
            cuts = []
            for i in big:  # each view cut by the rows it reads
                inputs = tuple(t[read.rows_of(i)] for t in cull_inputs)
                cuts += cut_views(self.culler, inputs, [batch.views[i]], capacity, margin)
            return cuts

        cut = None
        if local is not None:
            # Refused when a tile with its margin sees more than the cache: then two passes.
            with contextlib.suppress(ClmError):
                cut = cut_big(margin_for(local.reach))
        if cut is None:
            local = None
            self._drain()  # pass 1 gathers host rows the last step's CPU Adam may be writing
            cut = cut_big()
        cuts = dict(zip(big, cut, strict=True))
        units: list[View] = []
        owner: list[int] = []
        counts: list[int] = []
        for i, view in enumerate(batch.views):
            parts = cuts.get(i, [(view, per_view[i])])
            units += [unit for unit, _ in parts]
            owner += [i] * len(parts)
            counts += [n for _, n in parts]
        groups = group_units(counts)
        rows: list[Tensor] = []  # each group's
        canvases = {i: Canvas() for i in big} if local is None else {}
        settings = (batch.sh_degree, batch.background, batch.width)
        for group in groups:
            part = self._cull_units(units, owner, group, read)
            rows.append(part.ids)
            if local is None:  # pass 1
                batch.stats.bytes_to_gpu += self._paint(
                    canvases, units, owner, group, part, *settings
                )
        if local is None:
            for i, canvas in canvases.items():
                if read is not None:
                    canvas.also_drawn(read.drawn[i])
                batch.in_pieces[i] = ImageGrad(canvas, lambda out, i=i: batch.loss_fn(i, out))
        else:
            for i in big:
                batch.in_pieces[i] = CropGrad(i, local)
                if read is not None:
                    batch.in_pieces[i].canvas.also_drawn(read.drawn[i])
        # Rows a whole view draws without reading them (those of views in pieces are above).
        drawn = [
            read.drawn[owner[k]] if read is not None and not isinstance(unit, Piece) else None
            for k, unit in enumerate(units)
        ]
        if len(groups) == 1:
            self._take_rows(batch, part.ids)
            self._train_group(batch, units, owner, part, capacity, drawn=drawn)
        else:
            del part  # culled again, group by group: all their visibility at once could be large
            self._train_groups(batch, units, owner, groups, rows, capacity, read, drawn)
        for i, grads in batch.in_pieces.items():
            batch.observe(*grads.observed(), batch.views[i])

    def _train_groups(
        self,
        batch: _Batch,
        units: Sequence[View],
        owner: Sequence[int],
        groups: Sequence[Sequence[int]],
        rows: Sequence[Tensor],
        capacity: int,
        read: ReadCull | None,
        drawn: Sequence[Tensor | None],
    ) -> None:
        """Train ``groups`` of ``units`` one after the other (``rows``: what each culls to)."""
        self._take_rows(batch, torch.unique(torch.cat(list(rows))))
        at = [torch.searchsorted(batch.rows, ids) for ids in rows]
        uses = torch.zeros(batch.rows.numel(), dtype=torch.int32, device=self.device)
        for a in at:
            uses.index_add_(0, a, torch.ones_like(a, dtype=torch.int32))
        for group, a in zip(groups, at, strict=True):
            part = self._cull_units(units, owner, group, read)
            members, owners = [units[k] for k in group], [owner[k] for k in group]
            self._train_group(
                batch,
                members,
                owners,
                part,
                capacity,
                keep=uses[a] > 1,
                to_batch=a,
                drawn=[drawn[k] for k in group],
            )

    def _cull_units(
        self,
        units: Sequence[View],
        owner: Sequence[int],
        group: Sequence[int],
        read: ReadCull | None,
    ) -> CullResult:
        """The cull of ``units[group]``, with only the rows their views read when known."""
        culled = self._cull([units[k] for k in group])
        return culled if read is None else read.narrow(culled, [owner[k] for k in group])

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

    def _render_in_pieces(self, view: View, sh_degree: int, background: Tensor) -> RenderOutput:
        """Evaluation of a view larger than the cache: its pieces rendered and stitched."""
        pieces = cut_views(
            self.culler, self.spec.cull_inputs(self.key.views()), [view], self.capacity
        )[0]
        units = [piece for piece, _ in pieces]
        canvas = Canvas()
        for group in group_units([n for _, n in pieces]):
            culled = self._cull([units[k] for k in group])
            self._paint(
                {0: canvas},
                units,
                [0] * len(units),
                group,
                culled,
                sh_degree,
                background,
                self.host.width,
            )
        return canvas.output()

    # ---- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def render(self, view: View, sh_degree: int, background: Tensor) -> RenderOutput:
        """A view is rendered from the rows its pixels read, as in training; one that reads
        more rows than the cache holds is rendered in pieces and stitched, so evaluation never
        needs more GPU rows than training."""
        self._drain()
        ids = self._rows_read(self._cull([view]).ids, view)
        width = self.host.width
        if self.capacity is None or ids.numel() <= self.capacity:
            out = self._render_rows(ids, view, sh_degree, background, width)
            out.ids = ids[out.ids]
            return out
        return self._render_in_pieces(view, sh_degree, background)

    def _rows_read(self, ids: Tensor, view: View) -> Tensor:
        """Of ``ids``, culled in for ``view``, the rows its render reads (see
        :mod:`clm.offload.read_rows`): all of them without a reach, or when the walk does not
        fit the GPU budget. The host attributes the walk reads are gathered caught up."""
        if self.reach is None or not ids.numel():
            return ids
        params = unpack_rows(self.key.param[ids], self.key.layout)
        if self._reach_segments:
            values = self._caught_up(ids, self._reach_segments[-1].end)
            params.update(unpack_rows(values, self._reach_segments))
        try:
            return ids[self.reach.find(params, view).read]
        except torch.cuda.OutOfMemoryError:
            return ids

    def _caught_up(self, rows: Tensor, width: int) -> Tensor:
        """The leading ``width`` host-layout columns of ``rows``, caught up to ``self.step``:
        gathered for host rows, taken from the resident rows for the others."""
        values = torch.empty(rows.numel(), width, device=self.device)
        at = torch.arange(rows.numel(), device=self.device)
        if self.resident.count:
            at = at[self.resident.slots(rows) < 0]
        self.gather.gather(rows[at], at, width, values, catch_up=self.skips.to(self.step))
        if self.device.type == "cuda":  # the kernel reads host rows the host may write next
            torch.cuda.synchronize(self.device)
        self.resident.patch(rows, values, width)
        return values

    @torch.no_grad()
    def _render_rows(
        self, rows: Tensor, view: View, sh_degree: int, background: Tensor, width: int
    ) -> RenderOutput:
        """Render ``view`` from ``rows`` alone, without gradients, once they are caught up to
        ``self.step`` (their leading ``width`` columns)."""
        values = self._caught_up(rows, width)
        params = unpack_rows(self.key.param[rows], self.key.layout)
        params.update(unpack_rows(values, self.host.layout, sh_degree))
        return self.render_fn(params, view, sh_degree, background)
