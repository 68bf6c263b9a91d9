"""Frustum culling for the city's ray caster: the boxes and spheres that the rays through each
screen rectangle of a view can meet."""

from __future__ import annotations

import numpy as np
import torch

from clm.synthetic.cameras import Intrinsics
from clm.synthetic.materials import CityTensors


def frustum_lists(
    ct: CityTensors, far: float, w2c: np.ndarray, intr: Intrinsics, rects: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes and spheres inside each screen rectangle's frustum (and nearer than ``far``).

    ``rects`` [T, 4] holds pixel bounds u0, v0, u1, v1; returns ids [T, K], [T, S] padded
    with -1, valid ids first. The primitives are first culled against the frustum of the
    rectangles' bounding box, so the per-rectangle test costs rectangles x primitives in
    view, not x primitives in the city; what that drops lies outside every rectangle's
    frustum, so no ray through them could hit it.
    """
    bound = torch.cat([rects[:, :2].amin(0), rects[:, 2:].amax(0)])[None]
    box_mask, sphere_mask = _frustum_masks(w2c, intr, bound, ct.boxes, ct.spheres, far)
    box_sub, sphere_sub = box_mask[0].nonzero()[:, 0], sphere_mask[0].nonzero()[:, 0]
    box_mask, sphere_mask = _frustum_masks(
        w2c, intr, rects, ct.boxes[box_sub], ct.spheres[sphere_sub], far
    )
    return _global(_compact(box_mask), box_sub), _global(_compact(sphere_mask), sphere_sub)


def _frustum_masks(
    w2c: np.ndarray,
    intr: Intrinsics,
    rects: torch.Tensor,
    boxes: torch.Tensor,
    spheres: torch.Tensor,
    far: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [T, B], [T, S]: which of ``boxes``, ``spheres`` each rectangle's frustum meets."""
    dev = boxes.device
    rot = torch.as_tensor(w2c[:3, :3], dtype=torch.float32, device=dev)
    centre = torch.as_tensor(-w2c[:3, :3].T @ w2c[:3, 3], dtype=torch.float32, device=dev)
    u0, v0, u1, v1 = rects.unbind(-1)
    us, vs = torch.stack([u0, u1, u1, u0], -1), torch.stack([v0, v0, v1, v1], -1)
    corners = torch.stack(
        [(us - intr.cx) / intr.fx, (vs - intr.cy) / intr.fy, torch.ones_like(us)], -1
    )  # [T, 4, 3] camera frame
    normals = torch.cross(corners, corners.roll(-1, dims=1), dim=-1)
    middle = corners.mean(1, keepdim=True)
    normals = normals * torch.sign((normals * middle).sum(-1, keepdim=True))
    normals = normals @ rot  # to world: R^T n
    normals = normals / normals.norm(dim=-1, keepdim=True)

    boxes = boxes - centre.repeat(2)
    lo, hi = boxes[:, :3], boxes[:, 3:]
    reach = sum(
        torch.maximum(normals[..., a, None] * lo[:, a], normals[..., a, None] * hi[:, a])
        for a in range(3)
    )  # [T, 4, B]: the farthest box corner along each inward normal
    nearest = torch.maximum(lo, -hi).clamp(min=0).norm(dim=-1)
    box_mask = (reach >= 0).all(1) & (nearest <= far)

    rel = spheres[:, :3] - centre
    dist = torch.einsum("tpa,sa->tps", normals, rel)
    sphere_mask = (dist >= -spheres[:, 3]).all(1) & (rel.norm(dim=-1) - spheres[:, 3] <= far)
    return box_mask, sphere_mask


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """Row-wise ids of true entries of mask [T, N], valid first, padded with -1 to the max count."""
    n = mask.shape[1]
    k = max(int(mask.sum(1).max()) if mask.numel() else 0, 1)
    ids = torch.arange(n, device=mask.device).expand_as(mask)
    ids = torch.where(mask, ids, n).sort(dim=1).values[:, :k]
    return torch.where(ids < n, ids, -1)


def _global(ids: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Ids into ``subset`` (-1 padded) as ids into the whole set; ascending stays ascending."""
    if len(subset) == 0:
        return torch.full_like(ids, -1)
    return torch.where(ids >= 0, subset[ids.clamp(min=0)], -1)
