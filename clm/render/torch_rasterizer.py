"""A differentiable pure-torch rasterizer, so clm trains (and CI tests) on machines without CUDA.

It composites exactly what gsplat 1.5.3's tile rasterizer composites: front to back in depth
order, alpha = min(0.999, o·exp(-σ)) skipped below 1/255, and a pixel stops before the Gaussian
that would take its transmittance to 1e-4 or below. Instead of tiles it pairs each Gaussian with
the pixels of its bounding box; outside that box alpha is below 1/255 anyway, so the result is the
same. Pairs are sorted per pixel; the ones that contribute nothing (alpha under the threshold, or
behind the point where the pixel stops) are dropped without autograd, and on the rest the
transmittance is a segmented cumulative sum of log(1 - alpha) (in float64), so memory and time
scale with the pairs that matter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clm.render.projection import ALPHA_THRESHOLD


def pixel_pairs(
    means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor]:
    """(pixel, Gaussian) pairs covering each bounding box, sorted by pixel then depth."""
    device = means2d.device
    mx, my = means2d.detach().unbind(-1)
    rx, ry = radii[:, 0].to(mx.dtype), radii[:, 1].to(mx.dtype)
    x0 = torch.clamp(torch.floor(mx - rx) - 1, 0, width).long()
    x1 = torch.clamp(torch.ceil(mx + rx) + 1, 0, width).long()
    y0 = torch.clamp(torch.floor(my - ry) - 1, 0, height).long()
    y1 = torch.clamp(torch.ceil(my + ry) + 1, 0, height).long()
    nx, ny = torch.clamp_min(x1 - x0, 0), torch.clamp_min(y1 - y0, 0)
    counts = nx * ny

    # Generate pairs Gaussian by Gaussian in depth order, so a stable sort by pixel keeps depth
    # order (ties broken by index, like gsplat's stable radix sort).
    order = torch.argsort(depths.detach(), stable=True)
    counts_o = counts.index_select(0, order)
    gauss = torch.repeat_interleave(order, counts_o)
    starts = torch.cumsum(counts_o, 0) - counts_o
    local = torch.arange(gauss.numel(), device=device) - torch.repeat_interleave(starts, counts_o)
    nx_pair = nx.index_select(0, gauss)
    row, col = local // nx_pair, local % nx_pair
    pixel = (y0.index_select(0, gauss) + row) * width + x0.index_select(0, gauss) + col
    pixel, perm = torch.sort(pixel, stable=True)
    return pixel, gauss.index_select(0, perm)


def segment_starts(pixel: Tensor, num_pixels: int) -> Tensor:
    """Index of each pair's first pair with the same pixel (pairs sorted by pixel)."""
    per_pixel = torch.bincount(pixel, minlength=num_pixels)
    first = torch.cumsum(per_pixel, 0) - per_pixel
    return first[pixel]


def exclusive_segment_sum(values: Tensor, starts: Tensor) -> Tensor:
    """Sum of the earlier values of each pair's segment, in float64 (no cancellation)."""
    inclusive = torch.cumsum(values.double(), 0)
    before = inclusive - values.double()
    return before - before.index_select(0, starts)  # (x[idx] backward races on the CPU)


def pixel_centers(pixel: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """``[P, 2]`` centres of the pixels numbered ``pixel`` in row-major order."""
    return torch.stack([pixel % width, pixel // width], dim=-1).to(dtype) + 0.5


def pair_alpha(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    centers: Tensor,
    threshold: float = ALPHA_THRESHOLD,
) -> Tensor:
    """Each pair's alpha, min(0.999, o·exp(-σ)), and 0 where σ < 0 or alpha is under
    ``threshold`` (the compositing rule's 1/255 unless told)."""
    dx, dy = (means2d - centers).unbind(-1)
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy
    alpha = torch.clamp_max(opacities * torch.exp(-sigma), 0.999)
    return torch.where((sigma >= 0) & (alpha >= threshold), alpha, torch.zeros_like(alpha))


def rasterize(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    background: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians into an image ``[H, W, C]`` and its alpha ``[H, W, 1]``.

    All inputs describe the same M Gaussians (those with a non-zero radius); ``colors [M, C]``
    may have any number of channels.
    """
    num_pixels = width * height
    pixel, gauss = pixel_pairs(means2d, radii, depths, width, height)
    centers = pixel_centers(pixel, width, means2d.dtype)

    # Keep only pairs that contribute: no autograd, flat over all pairs.
    def per_pair(values: Tensor) -> Tensor:  # index_select: a fast gather, and index_add back
        return values.index_select(0, gauss)

    with torch.no_grad():
        alpha = pair_alpha(per_pair(means2d), per_pair(conics), per_pair(opacities), centers)
        keep = torch.nonzero(alpha > 0).squeeze(1)
        pixel, gauss, centers, alpha = (
            t.index_select(0, keep) for t in (pixel, gauss, centers, alpha)
        )
        log_t = torch.log1p(-alpha)
        after = exclusive_segment_sum(log_t, segment_starts(pixel, num_pixels)) + log_t
        keep = torch.nonzero(after > math.log(1e-4)).squeeze(1)
        pixel, gauss, centers = (t.index_select(0, keep) for t in (pixel, gauss, centers))

    alpha = pair_alpha(per_pair(means2d), per_pair(conics), per_pair(opacities), centers)
    log_t = torch.log1p(-alpha)
    trans_before = torch.exp(exclusive_segment_sum(log_t, segment_starts(pixel, num_pixels)))
    weights = alpha * trans_before.to(alpha.dtype)
    channels = colors.shape[1]
    image = colors.new_zeros(num_pixels, channels).index_add(
        0, pixel, weights[:, None] * colors[gauss]
    )
    log_final = log_t.new_zeros(num_pixels).index_add(0, pixel, log_t)
    final_t = torch.exp(log_final)[:, None]
    if background is not None:
        image = image + final_t * background
    return image.view(height, width, channels), (1.0 - final_t).view(height, width, 1)
