"""Which Gaussians may touch which camera of a batch, from the GPU-resident key attributes alone.

Two bounds, named like ``CullRoles.shape``; each is conservative for one of gsplat 1.5.3's
projections, so no Gaussian gsplat would draw is culled. Both also drop Gaussians behind the near
or beyond the far plane, and those below the 1/255 opacity under which gsplat's rasterizers skip
a Gaussian at every pixel.

``ellipsoid`` (3D Gaussians, gsplat's EWA projection): gsplat draws a Gaussian when its
``3.33·sqrt(Σ2d + 0.3)`` box (rounded up) overlaps the image, where ``Σ2d = J Σ Jᵀ`` uses the
Jacobian at the view-clamped position. A row of J has norm at most ``(f/z)·sqrt(1 + lim²)`` (lim:
the clamp limit), so ``Σ2d`` along an axis is at most ``(f/z)²(1 + lim²)·s_max²`` (the largest of
the three scales); a box of that radius (plus rounding) around the projected centre contains
gsplat's.

``surfel`` (flat 2D Gaussians, gsplat's 2DGS ray-splat projection): gsplat maps the splat's
plane through the homography ``T = K [s_u·u, s_v·v, m]`` (camera-space axes u, v from the
rotation, its two scales; a third scale column is ignored, here too) and, with rows T₀, T₁, T₂
of T and ``d = T₂·diag(1, 1, -1)·T₂``, takes the centre ``c`` and half-width ``h`` (per axis) of the
bounding box of the image of the 1σ circle, read off the dual conic ``T diag(1, 1, -1) Tᵀ``. Its
radius is ``ceil(3.33·sqrt(max(h², 1e-4)))`` around ``c``; there is no additive blur like 3DGS's
0.3 px², and ``radius > 0`` plus the box overlapping the image is all it tests. Then:

- the 1σ disc lies in the ball of radius ``ρ = max(s_u, s_v)`` around the centre, whatever its
  rotation (not a key attribute); while ``z > ρ`` the ball, so the disc, lies in front of the
  camera (then ``d < 0``: the image is an ellipse) and projects, per axis, into
  ``[C - H, C + H]``: the planes ``x = t·z`` that meet the ball are
  ``t ∈ (x̂ ± q·sqrt(x̂² + 1 - q²)) / (1 - q²)``, with ``x̂ = x/z`` and ``q = ρ/z``, so
  ``C = f·x̂/(1 - q²) + c_x`` and ``H = f·q·sqrt(x̂² + 1 - q²)/(1 - q²)``;
- ``[c - h, c + h] ⊂ [C - H, C + H]`` gives ``|c - C| ≤ H - h`` and ``h ≤ H``, so gsplat's box
  ``c ± ceil(3.33·max(h, 0.01))``, within ``c ± (3.33·h + 1)``, lies in ``C ± (3.33·H + 1)``:
  kept when that overlaps the image;
- gsplat computes ``h² = c² - (T₀·diag(1, 1, -1)·T₀)/d`` in float32, a difference of two terms
  of the size of (pixel coordinate)²: a tiny splat at the image's edge gets ``h`` of a few
  ten-thousandths of its pixel coordinate, and a radius of 2 or more instead of 1. Hence the pad
  ``1 + 5e-3·(max(W, H) + max(|c_x|, |c_y|))`` of the whole view (:data:`SURFEL_ROUNDING`)
  instead of 1; on tiny splats at the edges, float32 replicas of gsplat's projection (the test's
  in tests/test_cull_bounds.py, gsplat's own torch one) need ``1e-3`` at most;
- a splat closer than ``z = 2ρ`` (``q > 1/2``, including all whose 1σ circle crosses the camera
  plane, where gsplat's box is that of a hyperbola) is kept whenever its centre is between the
  planes. That costs little: for ``q > 1/3.33`` the box above contains the principal point.

Work is chunked over Gaussians (a kernel on CUDA, torch ops elsewhere), never ``N × cameras``;
the result is one bit word per Gaussian, so a batch costs one host sync per chunk, not per camera.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from clm.errors import ClmError
from clm.model.spec import CULL_SHAPES
from clm.offload.cuda_kernels import cupy_available, kernel, launch, pointer
from clm.render.base import View
from clm.render.projection import ALPHA_THRESHOLD

MAX_CAMERAS = 64
CAM_STRIDE = 24
EXTEND = 3.33 * 1.001  # gsplat's extent, with slack for float32 rounding
NEAR_PLANE, FAR_PLANE = 0.01, 1e10
# Below this logit the opacity is under 1/255 and gsplat skips the Gaussian (with slack).
MIN_OPACITY_LOGIT = math.log(ALPHA_THRESHOLD / (1 - ALPHA_THRESHOLD)) - 1e-3
# The bounds, as the kernel's mode argument: ``ellipsoid`` (3DGS) and ``surfel`` (2DGS).
BOUNDS = {shape: mode for mode, shape in enumerate(CULL_SHAPES)}
# Log-scale columns each bound reads: a 3D Gaussian's three, a surfel's first two (gsplat's 2DGS
# ignores a third).
SCALES_READ = {"ellipsoid": 3, "surfel": 2}  # the most columns each reads
# Surfel pad per pixel of the whole view's size and principal point, for gsplat's float32 h².
SURFEL_ROUNDING = 5e-3
# A surfel closer than this many of its largest scales is kept whenever it is between the planes.
SURFEL_NEAR_SCALES = 2.0
# Columns of a packed camera that depend on the whole image gsplat renders, not on a window of
# it: the clamp limits (ellipsoid) and the rounding pad (surfel).
WHOLE_VIEW_COLUMNS = (slice(18, 20), slice(23, 24))


def pack_cameras(views: Sequence[View]) -> Tensor:
    """``[B, 24]`` float32: R (9), t (3), fx, fy, cx, cy, W, H, 1+lim_x², 1+lim_y², near, far,
    extent multiplier, surfel pad (pixels)."""
    if len(views) > MAX_CAMERAS:
        raise ClmError(f"at most {MAX_CAMERAS} cameras are culled together, got {len(views)}")
    rows = []
    for v in views:
        vm = v.viewmat.detach().double().cpu().numpy()
        K = v.K.detach().double().cpu().numpy()
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        lim_x = max((v.width - cx) / fx, cx / fx) + 0.3 * 0.5 * v.width / fx
        lim_y = max((v.height - cy) / fy, cy / fy) + 0.3 * 0.5 * v.height / fy
        row = np.zeros(CAM_STRIDE)
        row[:9] = vm[:3, :3].reshape(-1)
        row[9:12] = vm[:3, 3]
        row[12:18] = (fx, fy, cx, cy, v.width, v.height)
        row[18:23] = (1 + lim_x**2, 1 + lim_y**2, NEAR_PLANE * (1 - 1e-5), FAR_PLANE, EXTEND)
        size = max(v.width, v.height) + max(abs(cx), abs(cy))
        row[23] = 1 + SURFEL_ROUNDING * size
        rows.append(row)
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def scales_read(log_scales: Tensor, bound: str) -> int:
    """Log-scale columns ``bound`` reads; refuses a bound it does not know and a scale count it
    is not proven for. An ellipsoid is bounded by the largest of the columns it is given (1 to
    3: a variant whose renderer repeats fewer scales, round Gaussians say, is bounded the same
    way); a surfel reads the first 2 of 2 or 3, as gsplat does (:data:`SCALES_READ`)."""
    if bound not in BOUNDS:
        raise ClmError(f"unknown culling bound {bound!r}; one of {tuple(BOUNDS)}")
    cols = log_scales.shape[1] if log_scales.dim() == 2 else 0
    allowed = (1, 2, 3) if bound == "ellipsoid" else (2, 3)
    if cols not in allowed:
        raise ClmError(
            f"the {bound} culling bound takes log-scales of {', '.join(map(str, allowed))} "
            f"columns, got shape {tuple(log_scales.shape)}"
        )
    return cols if bound == "ellipsoid" else SCALES_READ[bound]


def cull_bits_torch(
    means: Tensor,
    log_scales: Tensor,
    opacity_logits: Tensor,
    cams: Tensor,
    bound: str = "ellipsoid",
) -> Tensor:
    """Bit word per Gaussian (bit c: may touch camera c), the same arithmetic as the kernel."""
    read = scales_read(log_scales, bound)
    cams = cams.to(means.device)
    rot = cams[:, :9].reshape(-1, 3, 3)
    p = torch.einsum("bij,nj->bni", rot, means) + cams[:, None, 9:12]
    x, y, z = p.unbind(-1)
    col = lambda j: cams[:, j, None]  # noqa: E731
    rz = 1.0 / z
    if bound == "ellipsoid":
        s2 = torch.exp(log_scales.max(dim=-1).values)[None] ** 2
        px, py = col(12) * x * rz + col(14), col(13) * y * rz + col(15)
        fxz, fyz = col(12) * rz, col(13) * rz
        rx = col(22) * torch.sqrt(fxz * fxz * col(18) * s2 + 0.3) + 1.5
        ry = col(22) * torch.sqrt(fyz * fyz * col(19) * s2 + 0.3) + 1.5
        near = torch.zeros_like(z, dtype=torch.bool)
    else:
        q = torch.exp(log_scales[:, :read].max(dim=-1).values)[None] * rz
        near = ~(q <= 1.0 / SURFEL_NEAR_SCALES)  # NaN too
        w = 1.0 - q * q
        xn, yn = x * rz, y * rz
        px = col(12) * xn / w + col(14)
        py = col(13) * yn / w + col(15)
        rx = col(22) * (col(12) * q * torch.sqrt(xn * xn + w) / w) + col(23)
        ry = col(22) * (col(13) * q * torch.sqrt(yn * yn + w) / w) + col(23)
    inside = (px + rx > 0) & (px - rx < col(16)) & (py + ry > 0) & (py - ry < col(17))
    vis = (
        (z >= col(20))
        & (z <= col(21))
        & (near | inside)
        & (opacity_logits >= MIN_OPACITY_LOGIT)[None]
    )
    weights = torch.ones(vis.shape[0], dtype=torch.int64, device=means.device)
    weights = torch.bitwise_left_shift(weights, torch.arange(vis.shape[0], device=means.device))
    return (vis.long() * weights[:, None]).sum(0)


@dataclass
class CullResult:
    """``ids``: ascending rows visible to some camera; ``vis[b, j]``: camera b sees ``ids[j]``."""

    ids: Tensor  # [U] int64
    vis: Tensor  # [B, U] bool


def unpack_bits(bits: Tensor, num_cameras: int) -> Tensor:
    shifts = torch.arange(num_cameras, device=bits.device)
    return (torch.bitwise_right_shift(bits[None, :], shifts[:, None]) & 1).bool()


def _column_stride(t: Tensor) -> int:
    """Floats between rows of a ``[n]`` or ``[n, k]`` view whose columns are adjacent."""
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError("culling needs the columns of an attribute side by side")
    return t.stride(0)


class Culler:
    """Culls key attributes in chunks; uses the CUDA kernel when CuPy is there.

    ``bound`` is the shape the test is proven for (see the module): ``ellipsoid`` for 3D
    Gaussians (log-scales of 3 columns), ``surfel`` for gsplat's 2DGS splats (2 or 3 columns, the
    first two read).

    Each view's packed camera is made once and kept on the device (a view whose matrices change
    in place is packed again), so culling a batch needs no host sync but the one that counts
    the visible rows.
    """

    MAX_CACHED_VIEWS = 4096

    def __init__(
        self, device: torch.device, chunk: int = 1 << 24, bound: str = "ellipsoid"
    ) -> None:
        if bound not in BOUNDS:
            raise ClmError(f"unknown culling bound {bound!r}; one of {tuple(BOUNDS)}")
        self.device = device
        self.bound = bound
        self.use_kernel = device.type == "cuda" and cupy_available()
        # Torch intermediates are [B, chunk] wide, so the twin works in smaller chunks.
        self.chunk = chunk if self.use_kernel else max(chunk // 64, 1 << 14)
        self._cameras: dict[tuple[int, ...], tuple[View, Tensor]] = {}

    def cameras(self, views: Sequence[View]) -> Tensor:
        """``[B, 24]`` packed cameras on the device."""
        if len(views) > MAX_CAMERAS:
            raise ClmError(f"at most {MAX_CAMERAS} cameras are culled together, got {len(views)}")
        rows = []
        for view in views:
            key = (id(view), id(view.viewmat), view.viewmat._version, id(view.K), view.K._version)
            hit = self._cameras.get(key)
            if hit is None or hit[0] is not view:
                if len(self._cameras) >= self.MAX_CACHED_VIEWS:
                    self._cameras.clear()
                hit = (view, pack_cameras([view])[0].to(self.device))
                self._cameras[key] = hit
            rows.append(hit[1])
        return torch.stack(rows)

    def _bits(self, means: Tensor, log_scales: Tensor, opacity: Tensor, cams: Tensor) -> Tensor:
        if not self.use_kernel:
            return cull_bits_torch(means, log_scales, opacity, cams, self.bound)
        read = scales_read(log_scales, self.bound)
        out = torch.empty(means.shape[0], dtype=torch.int64, device=means.device)
        args = (
            np.uint64(means.data_ptr()),
            np.int64(_column_stride(means)),
            np.uint64(log_scales.data_ptr()),
            np.int64(_column_stride(log_scales)),
            np.int32(read),
            np.uint64(opacity.data_ptr()),
            np.int64(_column_stride(opacity)),
            np.int64(means.shape[0]),
            pointer(cams),
            np.int32(cams.shape[0]),
            np.float32(MIN_OPACITY_LOGIT),
            np.int32(BOUNDS[self.bound]),
            pointer(out),
        )
        launch(kernel("cull.cu", "cull_bits"), means.shape[0], args)
        return out

    def _chunk_bits(
        self, means: Tensor, log_scales: Tensor, opacity_logits: Tensor, views: Sequence[View]
    ) -> Iterator[tuple[int, Tensor]]:
        """``(start, bit words)`` for each chunk of rows against ``views``."""
        scales_read(log_scales, self.bound)  # refused before any work
        cams = self.cameras(views)
        for start in range(0, means.shape[0], self.chunk):
            stop = min(start + self.chunk, means.shape[0])
            yield (
                start,
                self._bits(
                    means[start:stop], log_scales[start:stop], opacity_logits[start:stop], cams
                ),
            )

    def visible_counts(
        self, means: Tensor, log_scales: Tensor, opacity_logits: Tensor, views: Sequence[View]
    ) -> list[int]:
        """Rows each of ``views`` (any number of them) may see."""
        counts = torch.zeros(len(views), dtype=torch.int64, device=means.device)
        for first, _, bits in self._groups(means, log_scales, opacity_logits, views):
            for b in range(min(MAX_CAMERAS, len(views) - first)):
                counts[first + b] += (torch.bitwise_right_shift(bits, b) & 1).sum()
        return counts.tolist()

    def visit_counts(
        self, means: Tensor, log_scales: Tensor, opacity_logits: Tensor, views: Sequence[View]
    ) -> Tensor:
        """``[N]`` int32: how many of ``views`` (any number of them) may see each row."""
        counts = torch.zeros(means.shape[0], dtype=torch.int32, device=means.device)
        for first, start, bits in self._groups(means, log_scales, opacity_logits, views):
            part = counts[start : start + bits.shape[0]]
            for b in range(min(MAX_CAMERAS, len(views) - first)):
                part += (torch.bitwise_right_shift(bits, b) & 1).int()
        return counts

    def _groups(
        self, means: Tensor, log_scales: Tensor, opacity_logits: Tensor, views: Sequence[View]
    ) -> Iterator[tuple[int, int, Tensor]]:
        """``(first view, first row, bit words)`` for groups of at most MAX_CAMERAS views and
        chunks of rows: never a ``[views, rows]`` tensor."""
        for first in range(0, len(views), MAX_CAMERAS):
            group = views[first : first + MAX_CAMERAS]
            for start, bits in self._chunk_bits(means, log_scales, opacity_logits, group):
                yield first, start, bits

    def cull(
        self, means: Tensor, log_scales: Tensor, opacity_logits: Tensor, views: Sequence[View]
    ) -> CullResult:
        ids_parts, bits_parts = [], []
        for start, bits in self._chunk_bits(means, log_scales, opacity_logits, views):
            ids = torch.nonzero(bits).squeeze(1)
            ids_parts.append(ids + start)
            bits_parts.append(bits[ids])
        if not ids_parts:
            empty = torch.zeros(0, dtype=torch.int64, device=means.device)
            return CullResult(
                empty, torch.zeros(len(views), 0, dtype=torch.bool, device=means.device)
            )
        bits = torch.cat(bits_parts)
        return CullResult(torch.cat(ids_parts), unpack_bits(bits, len(views)))
