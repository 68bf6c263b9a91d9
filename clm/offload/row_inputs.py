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

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.model.spec import ColumnSegment, active_span, joined_span


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
        # An output the loss does not read (an attribute read through a joined view) gets None
        # in backward, not a zero-filled gradient of its rows.
        ctx.set_materialize_grads(False)
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
            pieces = []
            for a, w, _ in layout:
                if grads[k] is not None:
                    pieces.append((a, w, grads[k].reshape(n, w)))
                k += 1
            packed = _packed_gradient(pieces, n, group[0].sink)
            start = 0
            for src in group:
                stop = start + src.index.shape[0]
                src.sink.index_add_(0, src.sink_index, packed[start:stop])
                start = stop
        return None, None, None


def _packed_gradient(pieces: list[tuple[int, int, Tensor]], n: int, sink: Tensor) -> Tensor:
    """``[n, sink width]`` from the gradients ``(first column, width, [n, width])`` of some
    outputs: zeros where none has one. Outputs that do not overlap are joined once (none at
    all when one covers every column, as a joined view does); overlapping ones (an attribute
    and a joined view holding it) are added."""
    width = sink.shape[1]
    pieces.sort(key=lambda p: p[0])
    if any(a + w > b for (a, w, _), (b, _, _) in itertools.pairwise(pieces)):
        packed = sink.new_zeros(n, width)
        for a, w, g in pieces:
            packed[:, a : a + w] += g
        return packed
    parts, at = [], 0
    for a, w, g in pieces:
        if a > at:
            parts.append(sink.new_zeros(n, a - at))
        parts.append(g)
        at = a + w
    if at < width:
        parts.append(sink.new_zeros(n, width - at))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class RowInputs:
    """Gathers render inputs from packed tables with given layouts (see module docstring).

    ``joins``: extra inputs, each a view of attributes that lie side by side in one layout (see
    :func:`clm.model.spec.joined_span`), given where they do; a renderer that wants them joined
    reads the view instead of copying every row into one."""

    def __init__(
        self,
        layouts: Sequence[Sequence[ColumnSegment]],
        joins: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.layouts = [list(layout) for layout in layouts]
        self.joins = dict(joins or {})
        self._spans: dict[int | None, tuple[list[str], list[list[_Span]]]] = {}

    def spans(self, sh_degree: int | None) -> tuple[list[str], list[list[_Span]]]:
        """The inputs' names, and per layout where each sits (its attributes, then its joins);
        ``sh_rest`` keeps its active bands only."""
        if sh_degree not in self._spans:
            names, spans = [], []
            for layout in self.layouts:
                here = [active_span(seg, sh_degree) for seg in layout]
                names += [seg.attr.name for seg in layout]
                for name, members in self.joins.items():
                    span = joined_span(layout, members, sh_degree)
                    if span is not None:
                        here.append(span)
                        names.append(name)
                spans.append(here)
            self._spans[sh_degree] = names, spans
        return self._spans[sh_degree]

    def gather(
        self, sources: Sequence[Source | Sequence[Source]], sh_degree: int | None
    ) -> dict[str, Tensor]:
        """Inputs by name, from ``sources`` (per layout, in order: a source, or sources whose
        rows follow one another)."""
        names, spans = self.spans(sh_degree)
        groups = tuple((s,) if isinstance(s, Source) else tuple(s) for s in sources)
        anchor = torch.empty(0, device=groups[0][0].table.device, requires_grad=True)
        outputs = _Gather.apply(anchor, groups, spans)
        return dict(zip(names, outputs, strict=True))
