"""The torch twin's rasterizer of 2D Gaussian splats: gsplat 1.5.3's 2DGS forward pass, pair by
pair, differentiated by autograd (the projection and the image layout are in
:mod:`clm.render.surfels`).

A splat reaches every pixel of the 16x16 tiles its screen box touches, as in gsplat; of those,
only the pixels alpha >= 1/255 can reach are paired with it (:func:`pixel_boxes`), the pairs
that contribute nothing are dropped without autograd, chunk by chunk, and transmittance is a
segmented cumulative sum of log(1 - alpha) per pixel, so memory and time scale with the pairs
that matter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clm.render.projection import ALPHA_THRESHOLD
from clm.render.torch_rasterizer import exclusive_segment_sum, segment_starts

TILE_SIZE = 16
ALPHA_MAX = 0.999
TRANSMITTANCE_STOP = 1e-4
FILTER_INV_SQUARE = 2.0  # gsplat's FILTER_INV_SQUARE_2DGS: exponent 2 |d|², variance 0.5 px²
_PAIR_CHUNK = 1 << 20  # pairs tested at a time before autograd sees the ones that contribute


def pixel_boxes(
    table: Tensor, radii: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pixel ranges ``[x0, x1) × [y0, y1)`` per splat that hold every pixel it can reach.

    gsplat evaluates a splat at every pixel of the 16×16 tiles its box touches (its
    ``isect_tiles``); within those, alpha ≥ 1/255 needs exponent ≤ E = 2 ln(255 · opacity), so
    the pixel is within √(E/2) of the box centre (screen filter) or its ray meets the plane
    within √E of the centre (the surfel). The latter is the image of a disc, an ellipse whose
    screen box the dual conic ``T diag(E, E, -1) Tᵀ`` gives exactly when the disc lies in front
    of the camera; otherwise the tiles are kept whole. Generous margins keep this conservative.
    """
    t = table.detach().double()
    mx, my, opacity = t[:, 9], t[:, 10], t[:, 11]
    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    tx, ty = (table[:, 9:11].detach().float() / TILE_SIZE).unbind(-1)  # as gsplat, in float
    rx, ry = (radii.float() / TILE_SIZE).unbind(-1)
    tile_x0 = torch.clamp(torch.floor(tx - rx), 0, tiles_x).double() * TILE_SIZE
    tile_x1 = torch.clamp(torch.clamp(torch.ceil(tx + rx), 0, tiles_x) * TILE_SIZE, max=width)
    tile_y0 = torch.clamp(torch.floor(ty - ry), 0, tiles_y).double() * TILE_SIZE
    tile_y1 = torch.clamp(torch.clamp(torch.ceil(ty + ry), 0, tiles_y) * TILE_SIZE, max=height)

    budget = 2.0 * torch.log(torch.clamp_min(opacity * 255.0, 1e-30))
    budget = torch.where(budget >= 0, budget * 1.01 + 0.01, torch.full_like(budget, -1.0))
    reach = torch.sqrt(torch.clamp_min(budget, 0) / FILTER_INV_SQUARE)
    row_u, row_v, row_w = t[:, :3], t[:, 3:6], t[:, 6:9]
    scale = torch.stack([budget, budget, -torch.ones_like(budget)], dim=-1)

    def dual(a: Tensor, b: Tensor) -> Tensor:
        return (a * b * scale).sum(-1)

    c22 = dual(row_w, row_w)
    bounded = c22 < 0
    c22 = torch.where(bounded, c22, -torch.ones_like(c22))
    cx, cy = dual(row_u, row_w) / c22, dual(row_v, row_w) / c22
    hx = torch.sqrt(torch.clamp_min(cx * cx - dual(row_u, row_u) / c22, 0))
    hy = torch.sqrt(torch.clamp_min(cy * cy - dual(row_v, row_v) / c22, 0))
    x0 = torch.minimum(mx - reach, torch.where(bounded, cx - hx, -math.inf))
    x1 = torch.maximum(mx + reach, torch.where(bounded, cx + hx, math.inf))
    y0 = torch.minimum(my - reach, torch.where(bounded, cy - hy, -math.inf))
    y1 = torch.maximum(my + reach, torch.where(bounded, cy + hy, math.inf))
    # pixel x has its centre at x + 0.5: keep x in [floor(x0) - 1, ceil(x1) + 1)
    x0 = torch.maximum(torch.floor(torch.clamp(x0, -1, width + 1)) - 1, tile_x0)
    x1 = torch.minimum(torch.ceil(torch.clamp(x1, -1, width + 1)) + 1, tile_x1)
    y0 = torch.maximum(torch.floor(torch.clamp(y0, -1, height + 1)) - 1, tile_y0)
    y1 = torch.minimum(torch.ceil(torch.clamp(y1, -1, height + 1)) + 1, tile_y1)
    reaches = (budget >= 0)[:, None]
    boxes = torch.stack([x0, x1, y0, y1], dim=-1).long()
    return torch.where(reaches, boxes, torch.zeros_like(boxes)).unbind(-1)


def _pairs(
    table: Tensor, radii: Tensor, depths: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor]:
    """The (pixel, splat) pairs of each splat's :func:`pixel_boxes`, splat by splat in depth
    order (ties by row: gsplat's stable radix sort)."""
    x0, x1, y0, y1 = pixel_boxes(table, radii, width, height)
    nx, ny = torch.clamp_min(x1 - x0, 0), torch.clamp_min(y1 - y0, 0)
    order = torch.argsort(depths.detach(), stable=True)
    counts = (nx * ny).index_select(0, order)
    splat = torch.repeat_interleave(order, counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(splat.numel(), device=table.device)
    local -= torch.repeat_interleave(starts, counts)
    width_of = nx.index_select(0, splat)
    row = torch.div(local, width_of, rounding_mode="floor")
    pixel = (y0.index_select(0, splat) + row) * width + x0.index_select(0, splat)
    pixel += local - row * width_of
    return pixel, splat


def _alpha(columns: tuple[Tensor, ...], splat: Tensor, pixel: Tensor, width: int) -> Tensor:
    """Alpha of each (pixel, splat) pair; ``columns`` are 12 per-splat values: T row by row,
    the box centre, the opacity. Zero where the ray misses or alpha is under 1/255."""
    per_pair = [c.index_select(0, splat) for c in columns]  # one gather per column: fastest
    u0, u1, u2, v0, v1, v2, w0, w1, w2, mx, my, opacity = per_pair
    py_int = torch.div(pixel, width, rounding_mode="floor")
    px = (pixel - py_int * width).to(mx.dtype) + 0.5
    py = py_int.to(mx.dtype) + 0.5
    hu0, hu1, hu2 = px * w0 - u0, px * w1 - u1, px * w2 - u2
    hv0, hv1, hv2 = py * w0 - v0, py * w1 - v1, py * w2 - v2
    c0, c1, c2 = hu1 * hv2 - hu2 * hv1, hu2 * hv0 - hu0 * hv2, hu0 * hv1 - hu1 * hv0
    hit = c2 != 0
    c2 = torch.where(hit, c2, torch.ones_like(c2))
    su, sv = c0 / c2, c1 / c2
    on_plane = su * su + sv * sv
    dx, dy = mx - px, my - py
    on_screen = FILTER_INV_SQUARE * (dx * dx + dy * dy)
    exponent = torch.where(on_plane <= on_screen, on_plane, on_screen)
    alpha = torch.clamp_max(opacity * torch.exp(-0.5 * exponent), ALPHA_MAX)
    return torch.where(hit & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))


def rasterize_surfels(
    means2d: Tensor,
    transforms: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    distortion: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Composite M surfels: features ``[H, W, C]`` (on black), alpha ``[H, W, 1]`` and, if
    asked, the distortion ``[H, W, 1]`` of ``depths``."""
    num_pixels = width * height
    table = torch.cat([transforms.reshape(-1, 9), means2d, opacities[:, None]], dim=1)

    # Without autograd, and a chunk at a time: drop the pairs under the alpha threshold, sort
    # the rest by pixel (stable: depth order stays), then drop those behind the splat that
    # ends their pixel.
    with torch.no_grad():
        pixel, splat = _pairs(table, radii, depths, width, height)
        columns = table.detach().t().contiguous().unbind(0)
        kept, alphas = [pixel.new_zeros(0)], [table.new_zeros(0)]
        for start in range(0, pixel.numel(), _PAIR_CHUNK):
            chunk = slice(start, start + _PAIR_CHUNK)
            alpha = _alpha(columns, splat[chunk], pixel[chunk], width)
            keep = torch.nonzero(alpha > 0).squeeze(1)
            kept.append(keep + start)
            alphas.append(alpha.index_select(0, keep))
        keep = torch.cat(kept)
        pixel, splat = pixel.index_select(0, keep), splat.index_select(0, keep)
        pixel, perm = torch.sort(pixel, stable=True)
        splat = splat.index_select(0, perm)
        log_t = torch.log1p(-torch.cat(alphas).index_select(0, perm))
        after = exclusive_segment_sum(log_t, segment_starts(pixel, num_pixels)) + log_t
        keep = torch.nonzero(after > math.log(TRANSMITTANCE_STOP)).squeeze(1)
        pixel, splat = pixel.index_select(0, keep), splat.index_select(0, keep)

    alpha = _alpha(table.t().unbind(0), splat, pixel, width)
    log_t = torch.log1p(-alpha)
    starts = segment_starts(pixel, num_pixels)
    trans_before = torch.exp(exclusive_segment_sum(log_t, starts))
    weights = alpha * trans_before.to(alpha.dtype)
    channels = features.shape[1]
    image = features.new_zeros(num_pixels, channels).index_add(
        0, pixel, weights[:, None] * features.index_select(0, splat)
    )
    final_t = torch.exp(log_t.new_zeros(num_pixels).index_add(0, pixel, log_t))
    alpha_image = (1.0 - final_t).view(height, width, 1)
    distort = None
    if distortion:  # sum_i 2 w_i (z_i (1 - T_i) - sum_{j<i} w_j z_j), as gsplat accumulates it
        z = depths.index_select(0, splat)
        z_before = exclusive_segment_sum(weights * z, starts).to(z.dtype)
        covered = (1.0 - trans_before).to(z.dtype)
        per_pair = 2.0 * weights * (z * covered - z_before)
        distort = per_pair.new_zeros(num_pixels).index_add(0, pixel, per_pair)
        distort = distort.view(height, width, 1)
    return image.view(height, width, channels), alpha_image, distort
