"""A view's render inputs, gathered from packed rows, with gradients that go straight back.

The offloaded engine renders each view from rows gathered out of two packed tables (key rows on
the GPU, host rows in the cache). Made the plain way (index, ``requires_grad_``, per-attribute
slices), autograd gives every attribute slice its own zero-filled ``[n, width]`` gradient, sums
them into the leaf, and the engine then adds the leaf's gradient into the batch's buffer: several
full-width temporaries and a dozen launches per view, on a path the GPU waits for. One
:class:`RowInputs` call gathers every table with one op each and, in backward, concatenates
each table's gradients once and adds them into its buffer at the rows' positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.model.spec import ColumnSegment, active_span


@dataclass(frozen=True)
class Source:
    """Rows ``table[index]`` to render; their gradients go to ``sink[sink_index]``.

    Only the leading ``sink.shape[1]`` columns are read: the active attributes fill them in
    layout order. Several sources of one layout (the row cache and the resident rows) give one
    set of attribute rows, in order.
    """

    table: Tensor
    index: Tensor
    sink: Tensor
    sink_index: Tensor


_Span = tuple[int, int, tuple[int, ...]]  # first column, width, per-row shape


class _Gather(torch.autograd.Function):
    """Forward: attribute views of each source's rows. Backward: each source's gradients,
    packed again, are added into its sink; no input receives a gradient.

    ``anchor`` is a zero-size tensor that requires grad, so that the outputs do: the tables
    are optimiser state, not autograd leaves.
    """

    @staticmethod
    def forward(ctx, anchor, groups, spans):
        outputs = []
        ctx.groups, ctx.spans = groups, spans
        for group, layout in zip(groups, spans, strict=True):
            parts = [src.table[:, : src.sink.shape[1]].index_select(0, src.index) for src in group]
            rows = parts[0] if len(parts) == 1 else torch.cat(parts)
            n = rows.shape[0]
            outputs += [rows[:, a : a + w].view(n, *shape) for a, w, shape in layout]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        k = 0
        for group, layout in zip(ctx.groups, ctx.spans, strict=True):
            n = sum(src.index.shape[0] for src in group)
            parts = []
            for _, w, _ in layout:
                g = grads[k]
                parts.append(g.reshape(n, w) if g is not None else group[0].sink.new_zeros(n, w))
                k += 1
            packed = torch.cat(parts, dim=1)
            start = 0
            for src in group:
                stop = start + src.index.shape[0]
                src.sink.index_add_(0, src.sink_index, packed[start:stop])
                start = stop
        return None, None, None


class RowInputs:
    """Gathers render inputs from packed tables with given layouts (see module docstring)."""

    def __init__(self, layouts: Sequence[Sequence[ColumnSegment]]) -> None:
        self.layouts = [list(layout) for layout in layouts]
        self._spans: dict[int | None, list[list[_Span]]] = {}

    def spans(self, sh_degree: int | None) -> list[list[_Span]]:
        """Per layout, where each attribute sits; ``sh_rest`` keeps its active bands only."""
        if sh_degree not in self._spans:
            self._spans[sh_degree] = [
                [active_span(seg, sh_degree) for seg in layout] for layout in self.layouts
            ]
        return self._spans[sh_degree]

    def gather(
        self, sources: Sequence[Source | Sequence[Source]], sh_degree: int | None
    ) -> dict[str, Tensor]:
        """Attributes by name, from ``sources`` (per layout, in order: a source, or sources
        whose rows follow one another)."""
        spans = self.spans(sh_degree)
        groups = tuple((s,) if isinstance(s, Source) else tuple(s) for s in sources)
        anchor = torch.empty(0, device=groups[0][0].table.device, requires_grad=True)
        outputs = _Gather.apply(anchor, groups, spans)
        names = [seg.attr.name for layout in self.layouts for seg in layout]
        return dict(zip(names, outputs, strict=True))
