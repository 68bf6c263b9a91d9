"""Memory budgets: ``--max-gpu-gb`` as a hard cap on what the process may reserve, and a plan,
made before training, of how many Gaussians and how large a row cache fit under it.

Costs per Gaussian on the GPU (float32):

* ``none``: every attribute with its gradient and two Adam moments, ``16·W`` bytes (W = floats
  per Gaussian, 59 for 3DGS at SH degree 3), plus density statistics;
* ``naive``: a parameter and a gradient row for every Gaussian each step, ``8·W``;
* ``clm``: only the key attributes (7 floats for 3DGS: position, log-scale, opacity; 11 when
  the engine factory adds the rotations the walk reads) with their Adam moments, ``12·K``,
  plus density statistics and residency bookkeeping; the host rows visit the GPU through the
  row cache, whose slots (a parameter and a gradient row of the non-key width) are sized from
  what is left. Each row a view renders also costs its gathered copies and their gradients.
  Whatever the plan leaves unused while the model is smaller than its limit holds resident
  rows (:mod:`clm.offload.resident_rows`), and so does what the first training steps leave of
  the budget (:mod:`clm.offload.step_memory`).

Rendering needs workspace in proportion to the pixels and to the Gaussians one view sees; the
plan reserves it from the image size and the cache size (a view never sees more rows than the
cache holds).

How large the cache should be depends on the scene: a street-level view sees a few percent of a
city, an aerial view half of it. A view that sees more rows than the cache holds is rendered in
pieces (:mod:`clm.offload.pieces`), so the cache need not hold the busiest view; holding it saves
the pieces' margins and the rows they share crossing again (and, for a loss that is not local,
a second render pass). When the training views are known, the planner culls them
against the initial Gaussians and sizes the cache for the busiest view's share (with a margin
for densification) at the largest Gaussian count that then fits, as long as that cache takes at
most half of what is left after the pixel workspace. Otherwise the Gaussians get the other half
and the cache what is left of it, never less than a piece of a few tiles needs at the scene's
density. When the views are unknown, the cache gets a fixed share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.errors import ClmError
from clm.model.spec import GaussianSpec
from clm.offload.culling import Culler
from clm.offload.pieces import PIECE_FILL, TILE
from clm.render.base import View

log = logging.getLogger(__name__)

GIB = 1 << 30
DENSITY_STATS_BYTES = 8  # accumulated screen-space gradient and visit count
RESIDENCY_BYTES = 8  # clm: a row's resident slot number and visit count
# clm, per row a batch sees (at most every row): its id, visibility bits and their unpacked
# words, its key gradient, where the split puts it. Growth takes this much more per row.
BATCH_ROW_BYTES = 160
RENDER_BYTES_PER_PIXEL = 1024  # images, alpha, loss and SSIM intermediates, their gradients
# Per row a view renders with --offload none or naive: gsplat's projected and intersection data,
# the concatenated SH coefficients, and their gradients.
RENDER_BYTES_PER_VISIBLE_ROW = 700
# Per float of a row a clm view renders: its gathered copy and gradient, with the above. Measured
# at 40M Gaussians, SH degree 3 (59 floats), as the most allocated while rendering one view:
# 530-830 B a rendered row; this plans 944.
RENDER_BYTES_PER_RENDERED_FLOAT = 16
CACHE_SHARE = 0.3  # of what is left after the pixel workspace, when view shares are unknown
VIEW_SHARE_MARGIN = 1.25  # a view's share of the scene may grow as densification goes on
MIN_VIEW_SHARE = 0.01  # never plan a cache for less than 1% of the scene per view
# Beyond this share of what is left, the cache no longer holds the busiest view: the Gaussians
# get the rest and large views go in pieces.
MAX_CACHE_SHARE = 0.5
MIN_PIECE_PIXELS = 64 * TILE * TILE  # the smallest cache holds a piece of 64 tiles
# Chunk-sized temporaries: culling bit words, the key Adam's gradient chunk, CUDA context slack.
TRANSIENT_BYTES = 768 << 20


def apply_gpu_cap(device: torch.device, max_gpu_gb: float) -> int:
    """Make ``max_gpu_gb`` a hard limit for this process's CUDA allocator; returns bytes."""
    total = torch.cuda.get_device_properties(device).total_memory
    limit = int(max_gpu_gb * GIB)
    if limit > total:
        raise ClmError(
            f"--max-gpu-gb {max_gpu_gb:g} is more than the GPU has ({total / GIB:.1f} GiB)"
        )
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    return limit


@dataclass(frozen=True)
class GpuPlan:
    budget: int
    per_gaussian: int
    cache_rows: int
    workspace: int
    max_gaussians: int
    pieces: int = 1  # the busiest view's pieces at max_gaussians (1: rendered whole)

    def describe(self, offload: str) -> str:
        parts = [
            f"GPU budget {self.budget / GIB:.1f} GiB ({offload}): up to "
            f"{self.max_gaussians / 1e6:.2f}M Gaussians at {self.per_gaussian} B each"
        ]
        if self.cache_rows:
            parts.append(f"a row cache of {self.cache_rows / 1e6:.2f}M rows")
        parts.append(f"{self.workspace / GIB:.1f} GiB render workspace")
        line = ", ".join(parts)
        if self.pieces > 1:
            line += (
                "; views larger than the cache are rendered in pieces (the busiest in about "
                f"{self.pieces} at {self.max_gaussians / 1e6:.2f}M Gaussians)"
            )
        return line


def plan_gpu(
    spec: GaussianSpec,
    offload: str,
    budget: int,
    max_pixels: int,
    view_share: float | None = None,
) -> GpuPlan:
    """How many Gaussians (and cache rows) fit ``budget`` bytes of GPU memory.

    ``view_share``: the largest fraction of the Gaussians one training view sees (see
    :func:`busiest_view_share`); with it, the ``clm`` cache is sized for that view, or for
    pieces of it (see the module docstring).
    """
    width = sum(a.width for a in spec)
    key_width = sum(a.width for a in spec.key)
    host_width = width - key_width
    pixel_space = max_pixels * RENDER_BYTES_PER_PIXEL + TRANSIENT_BYTES
    left = budget - pixel_space
    if left <= 0:
        raise ClmError(
            f"GPU budget {budget / GIB:.2f} GiB is too small to render {max_pixels} pixels "
            f"(needs {pixel_space / GIB:.2f} GiB of workspace)"
        )
    cache_rows, most, pieces = 0, None, 1
    if offload == "clm":
        per_gaussian = 12 * key_width + DENSITY_STATS_BYTES + RESIDENCY_BYTES
        per_cache_row = (
            8 * host_width  # the cached row and its gradient
            + 4 * key_width  # the batch's key gradients
            + RENDER_BYTES_PER_RENDERED_FLOAT * width  # what a view's render takes for the row
        )
        if view_share is None:
            cache_rows = int(left * CACHE_SHARE) // per_cache_row
        else:
            cache_rows, most = _cache_for(left, per_gaussian, per_cache_row, view_share, max_pixels)
            busiest = view_share * most
            if busiest > cache_rows:
                pieces = math.ceil(busiest / (PIECE_FILL * cache_rows))
        rows_space = cache_rows * per_cache_row
    else:
        per_gaussian = (16 if offload == "none" else 8) * width + DENSITY_STATS_BYTES
        # Every Gaussian may be visible at once: the render workspace scales with all of them.
        per_gaussian += RENDER_BYTES_PER_VISIBLE_ROW
        rows_space = 0
    max_gaussians = max(0, (left - rows_space) // per_gaussian)
    if most is not None:  # not past what the cache was sized for
        max_gaussians = min(max_gaussians, most)
    workspace = budget - left + rows_space
    return GpuPlan(budget, per_gaussian, cache_rows, workspace, max_gaussians, pieces)


def _cache_for(
    left: int, per_gaussian: int, per_cache_row: int, view_share: float, max_pixels: int
) -> tuple[int, int]:
    """Cache rows and the most Gaussians for ``left`` bytes, when the busiest view sees
    ``view_share`` of them (see the module docstring)."""
    share = min(1.0, max(view_share * VIEW_SHARE_MARGIN, MIN_VIEW_SHARE))
    # N Gaussians need N·share rows for the busiest view whole: the largest N that fits
    whole = int(left / (per_gaussian + share * per_cache_row))
    if share * whole * per_cache_row <= MAX_CACHE_SHARE * left:
        return math.ceil(share * whole), whole
    most = int((1 - MAX_CACHE_SHARE) * left) // per_gaussian
    rows = (left - most * per_gaussian) // per_cache_row
    # rows per Gaussian for a piece of MIN_PIECE_PIXELS at PIECE_FILL of the cache (or the view)
    floor = min(share, share * MIN_PIECE_PIXELS / max_pixels / PIECE_FILL)
    if rows < floor * most:
        most = int(left / (per_gaussian + floor * per_cache_row))
        rows = math.ceil(floor * most)
    return rows, most


def busiest_view_share(
    spec: GaussianSpec, params: Mapping[str, Tensor], views: Sequence[View]
) -> float:
    """The largest fraction of ``params``' Gaussians that culling keeps for one of ``views``
    (on the views' device; only the attributes culling reads are moved there)."""
    if not views:
        raise ValueError("no views to measure")
    device = views[0].viewmat.device
    means, scales, opacities = (t.to(device) for t in spec.cull_inputs(params))
    if means.shape[0] == 0:
        return 0.0
    counts = Culler(device, bound=spec.cull.shape).visible_counts(means, scales, opacities, views)
    return max(counts) / means.shape[0]
