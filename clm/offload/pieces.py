"""Views that see more rows than the GPU row cache holds, rendered in pieces.

A piece is a window of a view's image, aligned to gsplat's 16-pixel tiles and culled on its
own, so it sees a fraction of what the whole view sees. A piece renders the *whole* view from
only the rows its window may touch, and keeps the window: each pixel there sees the same
Gaussians, projected the same way, as in a whole-image render. (A crop camera, K with the
principal point moved, is not the same function: gsplat clamps the projection's Jacobian at
limits set by the image size, so a Gaussian centred outside a crop would get another
footprint.) The culler takes the window as that crop camera but with the whole view's clamp
limits (and, for 2DGS surfels, its rounding pad), which keeps it conservative for the whole-view
projection (:class:`PieceCuller`).

Training stays exact, in two passes. Pass 1 renders every piece without gradients and stitches
the whole image (:class:`Canvas`); the loss is evaluated on it (a leaf tensor) and
backpropagated to the image alone. Pass 2 renders each piece again with gradients and
backpropagates its window times that image gradient (:class:`ImageGrad`). The loss is a
function of the pixels and each pixel depends only on Gaussians its piece kept, so parameter
gradients add up to the whole-image render's. The loss sees the stitched image and alpha; the
centres and radii it gets are merged from the pieces and carry no gradient.

A Gaussian drawn in several pieces gets a partial screen-space gradient from each;
:class:`ImageGrad` sums them per view, so density control sees what a whole-image render gives
(one visit per view, with the full gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.errors import ClmError
from clm.offload.culling import MAX_CAMERAS, WHOLE_VIEW_COLUMNS, Culler
from clm.render.base import RenderOutput, View

TILE = 16  # gsplat's tile size, in pixels
# Pieces are cut to at most this share of the cache: two fit at once, so the planner loads the
# next piece while one renders, and rows that neighbouring pieces share stay cached.
PIECE_FILL = 0.5
# Entries of a [units, rows] visibility culled and planned at once (with its int64 and float
# temporaries about 13 bytes each), when a batch goes in pieces.
PLAN_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class Piece(View):
    """The window ``[x0, x0 + width) x [y0, y0 + height)`` of ``full``'s image.

    As a View it is the crop camera (K's principal point moved by the window's origin), kept on
    the host: it is only packed for culling. Renders use ``full``.
    """

    full: View
    x0: int
    y0: int

    @property
    def tiles(self) -> tuple[int, int]:
        return math.ceil(self.width / TILE), math.ceil(self.height / TILE)

    def cut(self, image: Tensor) -> Tensor:
        """This window of a whole-view ``[H, W, C]`` image (a view of it)."""
        return image[self.y0 : self.y0 + self.height, self.x0 : self.x0 + self.width]

    def part(self, x0: int, y0: int, x1: int, y1: int) -> Piece:
        """The piece ``[x0, x1) x [y0, y1)`` of the whole view (inside this one)."""
        K = self.K.clone()
        K[0, 2] -= x0 - self.x0
        K[1, 2] -= y0 - self.y0
        return Piece(self.viewmat, K, x1 - x0, y1 - y0, self.full, x0, y0)

    def halves(self) -> tuple[Piece, Piece]:
        """Two pieces, split at a tile boundary across the longer side (at least two tiles)."""
        (tx, ty), x1, y1 = self.tiles, self.x0 + self.width, self.y0 + self.height
        if tx > 1 and (self.width >= self.height or ty == 1):
            mid = self.x0 + tx // 2 * TILE
            return self.part(self.x0, self.y0, mid, y1), self.part(mid, self.y0, x1, y1)
        mid = self.y0 + ty // 2 * TILE
        return self.part(self.x0, self.y0, x1, mid), self.part(self.x0, mid, x1, y1)


def whole(view: View) -> Piece:
    """The piece that covers all of ``view`` (its camera copied to the host once)."""
    viewmat, K = view.viewmat.detach().cpu(), view.K.detach().cpu()
    return Piece(viewmat, K, view.width, view.height, view, 0, 0)


class PieceCuller(Culler):
    """A :class:`Culler` that culls a :class:`Piece` with its whole view's clamp limits and
    surfel rounding pad (those its render uses), and counts visible rows without
    ``[views, rows]`` tensors. Its ``bound`` is the :class:`Culler`'s."""

    def cameras(self, views: Sequence[View]) -> Tensor:
        cams = super().cameras(views)
        at = [k for k, v in enumerate(views) if isinstance(v, Piece)]
        if at:
            full = super().cameras([views[k].full for k in at])
            for cols in WHOLE_VIEW_COLUMNS:
                cams[at, cols] = full[:, cols]
        return cams

    def visible_counts(
        self, means: Tensor, log_scales: Tensor, opacity_logits: Tensor, views: Sequence[View]
    ) -> list[int]:
        counts: list[int] = []
        for first in range(0, len(views), MAX_CAMERAS):
            group = views[first : first + MAX_CAMERAS]
            total = torch.zeros(len(group), dtype=torch.int64, device=means.device)
            for _, bits in self._chunk_bits(means, log_scales, opacity_logits, group):
                for c in range(len(group)):
                    total[c] += (torch.bitwise_right_shift(bits, c) & 1).sum()
            counts += total.tolist()
        return counts


def cut_views(
    culler: PieceCuller,
    cull_inputs: tuple[Tensor, Tensor, Tensor],
    views: Sequence[View],
    capacity: int,
) -> list[list[tuple[Piece, int]]]:
    """Each view's pieces, in raster order, with the rows each may see: at most
    ``PIECE_FILL * capacity``, or up to ``capacity`` for a piece of one tile. ``cull_inputs``:
    positions, log-scales and opacity logits (:meth:`GaussianSpec.cull_inputs`).

    Pieces still too large are halved, all of them in one culling pass per round.
    """
    target = max(1, int(capacity * PIECE_FILL))
    done: list[list[tuple[Piece, int]]] = [[] for _ in views]
    todo = [(k, whole(view)) for k, view in enumerate(views)]
    while todo:
        if any(piece.tiles == (1, 1) for _, piece in todo):
            raise ClmError(_tile_too_large(None, capacity))
        parts = [(k, half) for k, piece in todo for half in piece.halves()]
        counts = culler.visible_counts(*cull_inputs, [p for _, p in parts])
        todo = []
        for (k, piece), n in zip(parts, counts, strict=True):
            if n <= target or (piece.tiles == (1, 1) and n <= capacity):
                done[k].append((piece, n))
            elif piece.tiles == (1, 1):
                raise ClmError(_tile_too_large(n, capacity))
            else:
                todo.append((k, piece))
    return [sorted(pieces, key=lambda pn: (pn[0].y0, pn[0].x0)) for pieces in done]


def _tile_too_large(rows: int | None, capacity: int) -> str:
    sees = f"{rows} Gaussians, more" if rows is not None else "more Gaussians"
    return (
        f"one {TILE}x{TILE}-pixel tile of a view sees {sees} than the row cache holds "
        f"({capacity}); raise --max-gpu-gb, or cap the scene with --max-gaussians"
    )


def group_units(counts: Sequence[int]) -> list[list[int]]:
    """Consecutive units (views or pieces seeing ``counts`` rows) culled and planned together:
    at most ``MAX_CAMERAS`` and about ``PLAN_ELEMENTS`` visibility entries a group."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for k, n in enumerate(counts):
        full = len(current) == MAX_CAMERAS or (len(current) + 1) * (rows + n) > PLAN_ELEMENTS
        if current and full:
            groups.append(current)
            current, rows = [], 0
        current.append(k)
        rows += n
    if current:
        groups.append(current)
    return groups


class Canvas:
    """A whole view stitched from its pieces' renders (no gradients), with the rows they drew."""

    def __init__(self) -> None:
        self.image: Tensor | None = None
        self.alpha: Tensor | None = None
        self._drawn: list[tuple[Tensor, Tensor, Tensor]] = []  # global rows, centres, radii

    def paint(self, piece: Piece, out: RenderOutput, rows: Tensor) -> None:
        """Keep the window of ``out``, a render of ``piece.full`` from ``rows`` alone."""
        if self.image is None or self.alpha is None:
            self.image, self.alpha = torch.empty_like(out.image), torch.empty_like(out.alpha)
        piece.cut(self.image).copy_(piece.cut(out.image))
        piece.cut(self.alpha).copy_(piece.cut(out.alpha))
        self._drawn.append((rows[out.ids], out.means2d.detach(), out.radii))

    def output(self) -> RenderOutput:
        """The whole render; ``ids`` are the drawn rows (global, ascending), as each piece's
        render projects a row the same way their centres and radii are taken from any one."""
        if self.image is None or self.alpha is None:
            raise ValueError("nothing painted")
        ids, inverse = torch.unique(torch.cat([d[0] for d in self._drawn]), return_inverse=True)
        means2d = torch.cat([d[1] for d in self._drawn])
        radii = torch.cat([d[2] for d in self._drawn])
        means2d = means2d.new_zeros(ids.numel(), 2).index_copy_(0, inverse, means2d)
        radii = radii.new_zeros(ids.numel(), radii.shape[1]).index_copy_(0, inverse, radii)
        return RenderOutput(self.image, self.alpha, means2d, radii, ids)


class ImageGrad:
    """Pass 2 of a view rendered in pieces: the loss gradient with respect to its stitched
    image (and alpha), and the pieces' screen-space gradients summed per row."""

    def __init__(self, canvas: Canvas, loss: Callable[[RenderOutput], Tensor]) -> None:
        self.whole = canvas.output()
        image = self.whole.image.requires_grad_()
        alpha = self.whole.alpha.requires_grad_()
        loss(self.whole).backward()
        self.wrt_image, self.wrt_alpha = image.grad, alpha.grad
        self._grads: list[tuple[Tensor, Tensor]] = []  # global rows, their centres' gradients

    def loss(self, piece: Piece, out: RenderOutput) -> Tensor | None:
        """What a render of ``piece.full`` backpropagates: its window times the image gradient
        (None when the loss does not depend on the image)."""
        pairs = ((out.image, self.wrt_image), (out.alpha, self.wrt_alpha))
        terms = [(piece.cut(o) * piece.cut(g)).sum() for o, g in pairs if g is not None]
        return torch.stack(terms).sum() if terms else None

    def record(self, out: RenderOutput, rows: Tensor) -> None:
        """Keep the screen-space gradients of ``out`` (rendered from ``rows``, after backward)."""
        if out.means2d.grad is not None:
            self._grads.append((rows[out.ids], out.means2d.grad))

    def observed(self) -> tuple[Tensor, RenderOutput]:
        """Global rows and the whole render, its ``means2d.grad`` the sum of the pieces': what
        ``observe`` gets for a view rendered whole."""
        whole = self.whole
        out = RenderOutput(
            whole.image.detach(), whole.alpha.detach(), whole.means2d, whole.radii, whole.ids
        )
        if self._grads:
            grad = torch.zeros_like(whole.means2d)
            for rows, g in self._grads:
                grad.index_add_(0, torch.searchsorted(whole.ids, rows), g)
            out.means2d.grad = grad
        return whole.ids, out
