"""Which Gaussians may touch which camera of a batch, from the GPU-resident key attributes alone.

The test is conservative with respect to gsplat's own: gsplat draws a Gaussian when its
``3.33·sqrt(Σ2d + 0.3)`` box (rounded up) overlaps the image, where ``Σ2d = J Σ Jᵀ`` uses the
Jacobian at the view-clamped position. A row of J has norm at most ``(f/z)·sqrt(1 + lim²)`` (lim:
the clamp limit), so ``Σ2d`` along an axis is at most ``(f/z)²(1 + lim²)·s_max²``; a box of that
radius (plus rounding) around the projected centre contains gsplat's. Also dropped: Gaussians
behind the near or beyond the far plane, and those below gsplat's 1/255 opacity threshold.

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
from clm.offload.cuda_kernels import cupy_available, kernel, launch, pointer
from clm.render.base import View
from clm.render.projection import ALPHA_THRESHOLD

MAX_CAMERAS = 64
CAM_STRIDE = 24
EXTEND = 3.33 * 1.001  # gsplat's extent, with slack for float32 rounding
NEAR_PLANE, FAR_PLANE = 0.01, 1e10
# Below this logit the opacity is under 1/255 and gsplat skips the Gaussian (with slack).
MIN_OPACITY_LOGIT = math.log(ALPHA_THRESHOLD / (1 - ALPHA_THRESHOLD)) - 1e-3


def pack_cameras(views: Sequence[View]) -> Tensor:
    """``[B, 24]`` float32: R (9), t (3), fx, fy, cx, cy, W, H, 1+lim_x², 1+lim_y², near, far,
    extent multiplier, pad."""
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
        rows.append(row)
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def cull_bits_torch(
    means: Tensor, log_scales: Tensor, opacity_logits: Tensor, cams: Tensor
) -> Tensor:
    """Bit word per Gaussian (bit c: may touch camera c), the same arithmetic as the kernel."""
    cams = cams.to(means.device)
    rot = cams[:, :9].reshape(-1, 3, 3)
    p = torch.einsum("bij,nj->bni", rot, means) + cams[:, None, 9:12]
    x, y, z = p.unbind(-1)
    s2 = torch.exp(log_scales.max(dim=-1).values)[None] ** 2
    col = lambda j: cams[:, j, None]  # noqa: E731
    rz = 1.0 / z
    px, py = col(12) * x * rz + col(14), col(13) * y * rz + col(15)
    fxz, fyz = col(12) * rz, col(13) * rz
    rx = col(22) * torch.sqrt(fxz * fxz * col(18) * s2 + 0.3) + 1.5
    ry = col(22) * torch.sqrt(fyz * fyz * col(19) * s2 + 0.3) + 1.5
    vis = (
        (z >= col(20))
        & (z <= col(21))
        & (px + rx > 0)
        & (px - rx < col(16))
        & (py + ry > 0)
        & (py - ry < col(17))
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

    Each view's packed camera is made once and kept on the device (a view whose matrices change
    in place is packed again), so culling a batch needs no host sync but the one that counts
    the visible rows.
    """

    MAX_CACHED_VIEWS = 4096

    def __init__(self, device: torch.device, chunk: int = 1 << 24) -> None:
        self.device = device
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
            return cull_bits_torch(means, log_scales, opacity, cams)
        out = torch.empty(means.shape[0], dtype=torch.int64, device=means.device)
        args = (
            np.uint64(means.data_ptr()),
            np.int64(_column_stride(means)),
            np.uint64(log_scales.data_ptr()),
            np.int64(_column_stride(log_scales)),
            np.uint64(opacity.data_ptr()),
            np.int64(_column_stride(opacity)),
            np.int64(means.shape[0]),
            pointer(cams),
            np.int32(cams.shape[0]),
            np.float32(MIN_OPACITY_LOGIT),
            pointer(out),
        )
        launch(kernel("cull.cu", "cull_bits"), means.shape[0], args)
        return out

    def _chunk_bits(
        self, means: Tensor, log_scales: Tensor, opacity_logits: Tensor, views: Sequence[View]
    ) -> Iterator[tuple[int, Tensor]]:
        """``(start, bit words)`` for each chunk of rows against ``views``."""
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

    def cull_new(
        self,
        means: Tensor,
        log_scales: Tensor,
        opacity_logits: Tensor,
        views: Sequence[View],
        seen: Sequence[View],
    ) -> Tensor:
        """Ascending rows some view of ``views`` may see and no view of ``seen`` does."""
        want = _signed((1 << len(views)) - 1)
        skip = _signed(((1 << len(seen)) - 1) << len(views))
        parts = []
        for start, bits in self._chunk_bits(means, log_scales, opacity_logits, [*views, *seen]):
            keep = (bits & want != 0) & (bits & skip == 0)
            parts.append(torch.nonzero(keep).squeeze(1) + start)
        if not parts:
            return torch.zeros(0, dtype=torch.int64, device=means.device)
        return torch.cat(parts)


def _signed(mask: int) -> int:
    """A 64-bit mask as the int64 value with the same bits."""
    return mask - (1 << 64) if mask >= 1 << 63 else mask
