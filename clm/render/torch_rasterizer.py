"""A differentiable pure-torch rasterizer, so clm trains (and CI tests) on machines without CUDA.

It composites exactly what gsplat 1.5.3's tile rasterizer composites: front to back in depth
order, alpha = min(0.999, o·exp(-σ)) skipped below 1/255, and a pixel stops before the Gaussian
that would take its transmittance to 1e-4 or below. Instead of tiles it pairs each Gaussian with
the pixels of its bounding box; outside that box alpha is below 1/255 anyway, so the result is the
same. Pairs are sorted per pixel and laid out in a padded ``[pixels, depth]`` grid, where a
``cumprod`` gives the transmittance and autograd gives the gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clm.render.projection import ALPHA_THRESHOLD

# Padded grid elements per chunk of pixels: bounds memory (autograd keeps ~10 such grids).
_CHUNK_ELEMENTS = 1 << 22


def _pixel_pairs(
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
    counts_o = counts[order]
    gauss = torch.repeat_interleave(order, counts_o)
    starts = torch.cumsum(counts_o, 0) - counts_o
    local = torch.arange(gauss.numel(), device=device) - torch.repeat_interleave(starts, counts_o)
    nx_pair = nx[gauss]
    pixel = (y0[gauss] + local // nx_pair) * width + x0[gauss] + local % nx_pair
    pixel, perm = torch.sort(pixel, stable=True)
    return pixel, gauss[perm]


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
    device, dtype = colors.device, colors.dtype
    channels = colors.shape[1]
    num_pixels = width * height
    pixel, gauss = _pixel_pairs(means2d, radii, depths, width, height)

    per_pixel = torch.bincount(pixel, minlength=num_pixels)
    pixel_start = torch.cumsum(per_pixel, 0) - per_pixel
    slot = torch.arange(pixel.numel(), device=device) - pixel_start[pixel]
    depth_cap = max(int(per_pixel.max()) if pixel.numel() else 0, 1)

    # A dummy Gaussian (index M, opacity 0) fills the padding.
    dummy = means2d.shape[0]
    means_x = torch.cat([means2d, means2d.new_zeros(1, 2)])
    conics_x = torch.cat([conics, conics.new_zeros(1, 3)])
    opac_x = torch.cat([opacities, opacities.new_zeros(1)])
    colors_x = torch.cat([colors, colors.new_zeros(1, channels)])

    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    centers = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1) + 0.5

    rows_per_chunk = max(1, _CHUNK_ELEMENTS // depth_cap)
    image_parts, alpha_parts = [], []
    for p0 in range(0, num_pixels, rows_per_chunk):
        p1 = min(p0 + rows_per_chunk, num_pixels)
        lo, hi = int(pixel_start[p0]), int(pixel_start[p1 - 1] + per_pixel[p1 - 1])
        grid = torch.full(((p1 - p0) * depth_cap,), dummy, device=device, dtype=torch.long)
        grid[(pixel[lo:hi] - p0) * depth_cap + slot[lo:hi]] = gauss[lo:hi]

        delta = means_x.index_select(0, grid).view(p1 - p0, depth_cap, 2) - centers[p0:p1, None]
        conic = conics_x.index_select(0, grid).view(p1 - p0, depth_cap, 3)
        dx, dy = delta[..., 0], delta[..., 1]
        sigma = 0.5 * (conic[..., 0] * dx * dx + conic[..., 2] * dy * dy) + conic[..., 1] * dx * dy
        opac = opac_x.index_select(0, grid).view(p1 - p0, depth_cap)
        alpha = torch.clamp_max(opac * torch.exp(-sigma), 0.999)
        alpha = torch.where(
            (sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha)
        )
        with torch.no_grad():
            alive = torch.cumprod(1.0 - alpha, dim=1) > 1e-4
        alpha = alpha * alive
        trans_after = torch.cumprod(1.0 - alpha, dim=1)
        trans_before = torch.cat([torch.ones_like(trans_after[:, :1]), trans_after[:, :-1]], 1)
        weights = alpha * trans_before
        rgb = colors_x.index_select(0, grid).view(p1 - p0, depth_cap, channels)
        out = torch.einsum("pk,pkc->pc", weights, rgb)
        final_t = trans_after[:, -1:]
        if background is not None:
            out = out + final_t * background
        image_parts.append(out)
        alpha_parts.append(1.0 - final_t)

    image = torch.cat(image_parts).view(height, width, channels)
    alpha_img = torch.cat(alpha_parts).view(height, width, 1)
    return image, alpha_img
