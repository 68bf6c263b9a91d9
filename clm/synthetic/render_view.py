"""Ray-cast image of one view: primary rays grouped by screen tile, each tile culled against
its own frustum so a ray meets only the few primitives its tile can see, tiles batched under
the caster's memory budget; anti-aliasing re-renders only the pixels on an edge."""

from __future__ import annotations

import numpy as np
import torch

from clm.synthetic.cameras import Intrinsics
from clm.synthetic.frustum_lists import frustum_lists
from clm.synthetic.raycast import RayCaster
from clm.synthetic.shading import radiance


def render_view(
    caster: RayCaster, w2c: np.ndarray, intr: Intrinsics, samples: int = 1, tile: int = 32
) -> torch.Tensor:
    """Image [H, W, 3] in [0, 1] of one view, on the caster's device.

    With ``samples`` > 1, pixels on an edge (another primitive or a colour step next to
    them) are rendered again with samples x samples rays and averaged: anti-aliasing where
    it shows, at a fraction of the cost of supersampling every pixel.
    """
    dev = caster.device
    h, w = intr.height, intr.width
    tx, ty = -(-w // tile), -(-h // tile)
    iy, ix = torch.meshgrid(
        torch.arange(ty, device=dev), torch.arange(tx, device=dev), indexing="ij"
    )
    u0, v0 = (ix.reshape(-1) * tile).float(), (iy.reshape(-1) * tile).float()
    rects = torch.stack([u0, v0, u0 + tile, v0 + tile], -1)
    lists = frustum_lists(caster.ct, caster.far, w2c, intr, rects)
    py, px = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    centre = torch.tensor([[0.5, 0.5]], device=dev)
    rgb, ident = _pixels(caster, w2c, intr, lists, tile, px.reshape(-1), py.reshape(-1), centre)
    rgb, ident = rgb.reshape(h, w, 3), ident.reshape(h, w)
    if samples > 1:
        ey, ex = _edges(rgb, ident).nonzero(as_tuple=True)
        grid = (torch.arange(samples, device=dev, dtype=torch.float32) + 0.5) / samples
        gy, gx = torch.meshgrid(grid, grid, indexing="ij")
        offsets = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
        sub, _ = _pixels(caster, w2c, intr, lists, tile, ex, ey, offsets)
        rgb[ey, ex] = sub.mean(1)
    return rgb


def _pixels(
    caster: RayCaster,
    w2c: np.ndarray,
    intr: Intrinsics,
    lists: tuple[torch.Tensor, torch.Tensor],
    tile: int,
    px: torch.Tensor,
    py: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour [M, S, 3] and primitive id [M, S] of rays through pixels (px, py) [M] at
    sub-pixel offsets [S, 2], each traced against its screen tile's candidates."""
    dev = caster.device
    box_ids, sphere_ids = lists
    m, s = len(px), len(offsets)
    tx = -(-intr.width // tile)
    tile_of = (py // tile) * tx + px // tile
    order = torch.argsort(tile_of, stable=True)
    counts = torch.bincount(tile_of, minlength=len(box_ids))
    starts = torch.cumsum(counts, 0) - counts
    nb, ns = (box_ids >= 0).sum(1), (sphere_ids >= 0).sum(1)
    rot = torch.as_tensor(w2c[:3, :3], dtype=torch.float32, device=dev)
    centre = torch.as_tensor(-w2c[:3, :3].T @ w2c[:3, 3], dtype=torch.float32, device=dev)
    rgb = torch.zeros(m, s, 3, device=dev)
    ident = torch.zeros(m, s, dtype=torch.long, device=dev)
    busy = (counts > 0).nonzero()[:, 0]
    for group in _batches(busy, nb + ns, counts * s, caster.pair_budget):
        cnt = counts[group]
        j = torch.arange(int(cnt.max()), device=dev)
        valid = j < cnt[:, None]  # [G, r]
        pix = order[starts[group, None] + torch.minimum(j, cnt[:, None] - 1)]
        u = px[pix, None].float() + offsets[:, 0]  # [G, r, S]
        v = py[pix, None].float() + offsets[:, 1]
        cam = torch.stack(
            [(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, torch.ones_like(u)], -1
        )
        d = cam.reshape(len(group), -1, 3) @ rot
        d = d / d.norm(dim=-1, keepdim=True)
        o = centre.expand_as(d)
        kb, ks = int(nb[group].max()), int(ns[group].max())
        hits = caster.trace(o, d, box_ids[group, :kb], sphere_ids[group, :ks])
        keep = valid[..., None].expand(-1, -1, s).reshape(len(group), -1)
        hits = hits[keep]
        target = pix[valid]
        rgb[target] = radiance(caster, o[keep], d[keep], hits).reshape(-1, s, 3)
        ident[target] = (hits.kind * 2**32 + hits.index + 1).reshape(-1, s)
    return rgb, ident


def _batches(
    tiles: torch.Tensor, load: torch.Tensor, rays: torch.Tensor, budget: int
) -> list[torch.Tensor]:
    """Group tiles so each group's padded rays x candidates stays within the budget.

    Tiles are ordered by candidate count (in powers of two), then by ray count, so the tiles
    of a group are padded to similar sizes.
    """
    ids, load_l, rays_l = tiles.tolist(), load[tiles].tolist(), rays[tiles].tolist()
    order = sorted(range(len(ids)), key=lambda i: (load_l[i].bit_length(), rays_l[i]))
    groups, current, kmax, rmax = [], [], 0, 0
    for i in order:
        k, r = max(kmax, load_l[i]), max(rmax, rays_l[i])
        if current and (len(current) + 1) * r * (k + 8) > budget:
            groups.append(current)
            current, k, r = [], load_l[i], rays_l[i]
        current.append(ids[i])
        kmax, rmax = k, r
    if current:
        groups.append(current)
    return [torch.tensor(g, device=tiles.device) for g in groups]


def _edges(rgb: torch.Tensor, ident: torch.Tensor, step: float = 0.05) -> torch.Tensor:
    """Pixels [H, W] beside a neighbour that shows another primitive or differs by > step."""
    edge = torch.zeros_like(ident, dtype=torch.bool)
    across = (ident[:, 1:] != ident[:, :-1]) | ((rgb[:, 1:] - rgb[:, :-1]).abs().amax(-1) > step)
    down = (ident[1:] != ident[:-1]) | ((rgb[1:] - rgb[:-1]).abs().amax(-1) > step)
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    edge[1:] |= down
    edge[:-1] |= down
    return edge
