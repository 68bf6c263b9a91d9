"""The culled-in rows each view's render reads: the cull narrowed before planning.

Culling keeps every row whose bounds meet a view's frustum; the render composites far fewer
(:mod:`clm.render.reach`): in a large scene most are hidden behind nearer ones. The walk that
finds them reads the geometry, that is the key attributes and whichever of the renderer's
attributes live in host rows (for 3DGS the rotations: 16 of a row's 208 bytes, gathered and
caught up like any load). Only the rows read are then planned, gathered, rendered and stepped.
The others would get no gradient from the render: their Adam steps are skipped steps, applied
lazily in closed form, and density control is told they were drawn, as a whole render tells it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.offload.culling import CullResult
from clm.render.base import ReachFinder, RenderOutput, View


@dataclass(frozen=True)
class ReadCull:
    """``culled``: the rows some view reads, and which view reads which; ``drawn``: per view,
    the rows (global ids) it draws without reading them."""

    culled: CullResult
    drawn: list[Tensor]

    def rows_of(self, view: int) -> Tensor:
        """The rows view ``view`` reads (ascending global ids)."""
        return self.culled.ids[self.culled.vis[view]]

    def narrow(self, culled: CullResult, owners: Sequence[int]) -> CullResult:
        """``culled``, a cull of pieces of views ``owners`` (one each), with only the rows
        each one's view reads: a piece renders its view's camera, so its window reads the
        rows the view reads there."""
        ids = self.culled.ids
        if ids.numel() == 0:
            return CullResult(culled.ids[:0], culled.vis[:, :0])
        pos = torch.searchsorted(ids, culled.ids).clamp_max(ids.numel() - 1)
        vis = culled.vis & (ids[pos] == culled.ids) & self.culled.vis[list(owners)][:, pos]
        kept = torch.nonzero(vis.any(dim=0)).squeeze(1)
        return CullResult(culled.ids[kept], vis[:, kept])


def read_cull(
    finder: ReachFinder,
    culled: CullResult,
    views: Sequence[View],
    inputs: Callable[[Tensor], Mapping[str, Tensor]],
) -> ReadCull:
    """The rows of ``culled`` each of ``views`` reads; ``inputs(positions)``: the attributes
    ``finder`` reads, of the rows at those positions of ``culled``."""
    read = torch.zeros_like(culled.vis)
    drawn = []
    for b, view in enumerate(views):
        pos = torch.nonzero(culled.vis[b]).squeeze(1)
        if pos.numel() == 0:
            drawn.append(culled.ids[:0])
            continue
        reach = finder.find(inputs(pos), view)
        read[b, pos] = reach.read
        drawn.append(culled.ids[pos[reach.drawn & ~reach.read]])
    at = torch.nonzero(read.any(dim=0)).squeeze(1)
    return ReadCull(CullResult(culled.ids[at], read[:, at]), drawn)


def with_drawn(ids: Tensor, out: RenderOutput, drawn: Tensor | None) -> tuple[Tensor, RenderOutput]:
    """What ``observe`` gets for a render of the read rows (``ids``: global rows of
    ``out.ids``): the rows ``drawn`` without being read appended, with zero centres, radii and
    screen-space gradients, as a render of every culled-in row gives them (after backward)."""
    if drawn is None or drawn.numel() == 0:
        return ids, out
    n = drawn.numel()
    means2d = torch.cat([out.means2d.detach(), out.means2d.new_zeros(n, 2)])
    if out.means2d.grad is not None:
        means2d.grad = torch.cat([out.means2d.grad, out.means2d.grad.new_zeros(n, 2)])
    radii = torch.cat([out.radii, out.radii.new_zeros(n, out.radii.shape[1])])
    at = torch.arange(ids.numel() + n, device=ids.device)
    return torch.cat([ids, drawn]), RenderOutput(out.image, out.alpha, means2d, radii, at)
