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

Training stays exact. When the loss is a mean over pixels of terms that each look at most
``reach`` pixels away (L1, SSIM, 2DGS's normal and distortion terms), a piece is culled over its
window widened by a margin of at least ``reach``, so the render is exact over that region, and
the loss of that crop gives the window's pixels their whole-image gradients: one pass
(:class:`clm.offload.piece_grads.CropGrad`). Otherwise two passes: the first renders every piece
without gradients and stitches the whole image, the loss is backpropagated to it, and the
second renders each piece again and backpropagates its window times that image gradient
(:class:`clm.offload.piece_grads.ImageGrad`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor

from clm.engine.base import Box
from clm.errors import ClmError
from clm.offload.culling import MAX_CAMERAS, WHOLE_VIEW_COLUMNS, Culler
from clm.render.base import View

TILE = 16  # gsplat's tile size, in pixels
# Pieces are cut to at most this share of the cache: two fit at once, so the planner loads the
# next piece while one renders, and rows that neighbouring pieces share stay cached.
PIECE_FILL = 0.5
# Entries of a [units, rows] visibility culled and planned at once (with its int64 and float
# temporaries about 13 bytes each), when a batch goes in pieces.
PLAN_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class Piece(View):
    """The window ``[x0, x0 + width) x [y0, y0 + height)`` of ``full``'s image, culled over
    that window widened by ``margin`` pixels on each side (within the image): its region.

    As a View it is the window's crop camera (K's principal point moved by the window's
    origin), kept on the host: it is only packed for culling. Renders use ``full``.
    """

    full: View
    x0: int
    y0: int
    margin: int = 0

    @cached_property
    def box(self) -> Box:
        """The region ``(x0, y0, x1, y1)``: the window and its margin, within the image."""
        m, full = self.margin, self.full
        return (
            max(self.x0 - m, 0),
            max(self.y0 - m, 0),
            min(self.x0 + self.width + m, full.width),
            min(self.y0 + self.height + m, full.height),
        )

    @cached_property
    def region(self) -> View:
        """The crop camera of :attr:`box`, what the culler culls (the piece itself without a
        margin)."""
        if self.margin == 0:
            return self
        x0, y0, x1, y1 = self.box
        return replace(self.part(x0, y0, x1, y1), margin=0)

    @property
    def tiles(self) -> tuple[int, int]:
        return math.ceil(self.width / TILE), math.ceil(self.height / TILE)

    def cut(self, image: Tensor) -> Tensor:
        """This window of a whole-view ``[H, W, C]`` image (a view of it)."""
        return image[self.y0 : self.y0 + self.height, self.x0 : self.x0 + self.width]

    def part(self, x0: int, y0: int, x1: int, y1: int) -> Piece:
        """The piece ``[x0, x1) x [y0, y1)`` of the whole view (inside this one)."""
        crop = self.crop(x0 - self.x0, y0 - self.y0, x1 - self.x0, y1 - self.y0)
        return Piece(crop.viewmat, crop.K, crop.width, crop.height, self.full, x0, y0, self.margin)

    def halves(self) -> tuple[Piece, Piece]:
        """Two pieces, split at a tile boundary across the longer side (at least two tiles)."""
        (tx, ty), x1, y1 = self.tiles, self.x0 + self.width, self.y0 + self.height
        if tx > 1 and (self.width >= self.height or ty == 1):
            mid = self.x0 + tx // 2 * TILE
            return self.part(self.x0, self.y0, mid, y1), self.part(mid, self.y0, x1, y1)
        mid = self.y0 + ty // 2 * TILE
        return self.part(self.x0, self.y0, x1, mid), self.part(self.x0, mid, x1, y1)


def whole(view: View, margin: int = 0) -> Piece:
    """The piece that covers all of ``view`` (its camera copied to the host once)."""
    viewmat, K = view.viewmat.detach().cpu(), view.K.detach().cpu()
    return Piece(viewmat, K, view.width, view.height, view, 0, 0, margin)


def margin_for(reach: int) -> int:
    """The margin, in whole tiles, of pieces whose loss looks ``reach`` pixels away."""
    return TILE * math.ceil(reach / TILE)


class PieceCuller(Culler):
    """A :class:`Culler` that culls a :class:`Piece` over its region, with its whole view's
    clamp limits and surfel rounding pad (those its render uses), and counts visible rows
    without ``[views, rows]`` tensors. Its ``bound`` is the :class:`Culler`'s."""

    def cameras(self, views: Sequence[View]) -> Tensor:
        views = [v.region if isinstance(v, Piece) else v for v in views]
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
    margin: int = 0,
) -> list[list[tuple[Piece, int]]]:
    """Each view's pieces, in raster order, with the rows each may see over its region (the
    window and ``margin``): at most ``PIECE_FILL * capacity``, or up to ``capacity`` for a
    piece of one tile. ``cull_inputs``: positions, log-scales and opacity logits
    (:meth:`GaussianSpec.cull_inputs`).

    Pieces still too large are halved, all of them in one culling pass per round.
    """
    target = max(1, int(capacity * PIECE_FILL))
    done: list[list[tuple[Piece, int]]] = [[] for _ in views]
    todo = [(k, whole(view, margin)) for k, view in enumerate(views)]
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
