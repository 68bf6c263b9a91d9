"""Memory budgets: ``--max-gpu-gb`` as a hard cap on what the process may reserve, and a plan,
made before training, of how many Gaussians and how large a row cache fit under it.

Costs per Gaussian on the GPU (float32):

* ``none``: every attribute with its gradient and two Adam moments, ``16·W`` bytes (W = floats
  per Gaussian, 59 for 3DGS at SH degree 3), plus density statistics;
* ``naive``: a parameter and a gradient row for every Gaussian each step, ``8·W``;
* ``clm``: only the key attributes (11 floats for 3DGS) with their Adam moments, ``12·K``, plus
  density statistics; the host rows visit the GPU through the row cache, whose slots (a
  parameter and a gradient row of the non-key width) are sized from what is left.

Rendering needs workspace in proportion to the pixels and to the Gaussians one view sees; the
plan reserves it from the image size and the cache size (a view never sees more rows than the
cache holds).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from clm.errors import ClmError
from clm.model.spec import GaussianSpec

log = logging.getLogger(__name__)

GIB = 1 << 30
DENSITY_STATS_BYTES = 8  # accumulated screen-space gradient and visit count
RENDER_BYTES_PER_PIXEL = 1024  # images, alpha, loss and SSIM intermediates, their gradients
# Per row a view renders: gathered key and host values and their gradients, gsplat's projected
# and intersection data and their gradients.
RENDER_BYTES_PER_VISIBLE_ROW = 700
CACHE_SHARE = 0.3  # of what is left after the pixel workspace
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

    def describe(self, offload: str) -> str:
        parts = [
            f"GPU budget {self.budget / GIB:.1f} GiB ({offload}): up to "
            f"{self.max_gaussians / 1e6:.2f}M Gaussians at {self.per_gaussian} B each"
        ]
        if self.cache_rows:
            parts.append(f"a row cache of {self.cache_rows / 1e6:.2f}M rows")
        parts.append(f"{self.workspace / GIB:.1f} GiB render workspace")
        return ", ".join(parts)


def plan_gpu(spec: GaussianSpec, offload: str, budget: int, max_pixels: int) -> GpuPlan:
    """How many Gaussians (and cache rows) fit ``budget`` bytes of GPU memory."""
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
    cache_rows = 0
    if offload == "clm":
        per_gaussian = 12 * key_width + DENSITY_STATS_BYTES
        per_cache_row = 8 * host_width + 4 * key_width + RENDER_BYTES_PER_VISIBLE_ROW
        cache_rows = int(left * CACHE_SHARE) // per_cache_row
        rows_space = cache_rows * per_cache_row
    else:
        per_gaussian = (16 if offload == "none" else 8) * width + DENSITY_STATS_BYTES
        # Every Gaussian may be visible at once: the render workspace scales with all of them.
        per_gaussian += RENDER_BYTES_PER_VISIBLE_ROW
        rows_space = 0
    max_gaussians = max(0, (left - rows_space) // per_gaussian)
    return GpuPlan(budget, per_gaussian, cache_rows, budget - left + rows_space, max_gaussians)
