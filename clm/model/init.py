"""Initial Gaussians from a point cloud, as 3DGS does it: one isotropic Gaussian per point,
sized by the distance to its nearest neighbours, 10% opaque, coloured by the point."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from clm.model.spec import GaussianSpec
from clm.render.sh import rgb_to_sh0

_MORTON_BITS = 21


def _morton_codes(cells: Tensor) -> Tensor:
    """Interleave the bits of three non-negative 21-bit integer coordinates."""
    code = torch.zeros(cells.shape[0], dtype=torch.int64, device=cells.device)
    for bit in range(_MORTON_BITS):
        for axis in range(3):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    return code


def mean_neighbour_distance(points: Tensor, k: int = 3, window: int = 12) -> Tensor:
    """Root of the mean squared distance to (approximately) the ``k`` nearest neighbours.

    Exact kNN is quadratic without a spatial index; instead each point is compared with its
    ``window`` neighbours on either side along two Morton curves (one shifted by half a cell, so
    points split by a curve's seams meet on the other). Good enough for sizing initial Gaussians.
    """
    n = points.shape[0]
    if n < 2:
        return torch.full((n,), 0.01, dtype=points.dtype, device=points.device)
    lo, hi = points.min(0).values, points.max(0).values
    cell = torch.clamp_min((hi - lo).max() / (2**_MORTON_BITS - 2), 1e-12)
    best = torch.full((n, k), float("inf"), dtype=points.dtype, device=points.device)
    for shift in (0.0, 0.5):
        cells = ((points - lo) / cell + shift * 2**_MORTON_BITS / 64).long()
        cells = cells.clamp(0, 2**_MORTON_BITS - 1)
        order = torch.argsort(_morton_codes(cells))
        sorted_pts = points[order]
        cand = []
        for off in range(1, min(window, n - 1) + 1):
            fwd = torch.roll(sorted_pts, -off, 0)
            bwd = torch.roll(sorted_pts, off, 0)
            cand.append(((sorted_pts - fwd) ** 2).sum(1))
            cand.append(((sorted_pts - bwd) ** 2).sum(1))
        dist = torch.stack(cand, 1)
        dist[dist == 0] = float("inf")  # duplicates would give zero-sized Gaussians
        nearest = torch.topk(dist, min(k, dist.shape[1]), dim=1, largest=False).values
        unsorted = torch.empty_like(nearest)
        unsorted[order] = nearest
        best = torch.topk(torch.cat([best, unsorted], 1), k, dim=1, largest=False).values
    best[torch.isinf(best)] = float("nan")
    mean_sq = torch.nanmean(best, dim=1)
    fallback = (
        torch.nanmedian(mean_sq) if torch.isfinite(mean_sq).any() else points.new_tensor(1e-4)
    )
    mean_sq = torch.where(torch.isfinite(mean_sq), mean_sq, fallback)
    return torch.sqrt(torch.clamp_min(mean_sq, 1e-14))


def init_from_points(
    spec: GaussianSpec,
    points: np.ndarray,
    colors: np.ndarray,
    init_opacity: float = 0.1,
    init_scale: float = 1.0,
) -> dict[str, Tensor]:
    """Raw parameters ``[N, ...]`` (float32, CPU) for the spec's 3DGS attributes.

    Every column of the log-scales (three for 3DGS, two for flat splats, one for round ones)
    gets the neighbour distance. Attributes the recipe does not know (a variant's extra
    features) start at zero.
    """
    means = torch.as_tensor(np.asarray(points, dtype=np.float32))
    rgb = torch.as_tensor(np.asarray(colors, dtype=np.float32) / 255.0)
    n = means.shape[0]
    dist = mean_neighbour_distance(means) * init_scale
    roles = spec.cull
    known = {
        roles.position: means,
        roles.log_scales: torch.log(dist)[:, None].repeat(1, spec[roles.log_scales].width),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        roles.opacity_logit: torch.full((n,), float(np.log(init_opacity / (1 - init_opacity)))),
        "sh0": rgb_to_sh0(rgb)[:, None, :],
    }
    params = {}
    for attr in spec:
        value = known.get(attr.name, torch.zeros((n, *attr.shape)))
        if tuple(value.shape[1:]) != attr.shape:
            raise ValueError(
                f"{attr.name}: expected shape {attr.shape}, got {tuple(value.shape[1:])}"
            )
        params[attr.name] = value.float().contiguous()
    return params
