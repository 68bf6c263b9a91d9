"""EWA projection of 3D Gaussians to screen-space ellipses, as gsplat 1.5.3's CUDA kernel does it.

Written out in torch so the CPU rasterizer agrees with the CUDA one pixel for pixel: the same
clamped Jacobian, the same 0.3 px² blur, and the same opacity-aware bounding radius.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from clm.render.base import View

ALPHA_THRESHOLD = 1.0 / 255.0


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices ``[N, 3, 3]`` from quaternions ``(w, x, y, z)`` (normalised here)."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)


@dataclass
class Projection:
    """Screen-space Gaussians for one camera; ``visible`` marks those with a non-zero radius."""

    means2d: Tensor  # [N, 2]
    conics: Tensor  # [N, 3]: upper triangle (a, b, c) of the inverse 2D covariance
    depths: Tensor  # [N]
    radii: Tensor  # [N, 2] int32
    visible: Tensor  # [N] bool


def project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> Projection:
    """Project activated Gaussians (``scales`` and ``opacities`` already through exp/sigmoid)."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    mean_c = means @ rot.T + trans
    x, y, z = mean_c.unbind(-1)

    m = quat_to_rotmat(quats) * scales[:, None, :]
    covar = m @ m.transpose(1, 2)
    covar_c = rot @ covar @ rot.T

    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    rz = 1.0 / z
    tx = z * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x * rz))
    ty = z * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y * rz))
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [fx * rz, zero, -fx * tx * rz * rz, zero, fy * rz, -fy * ty * rz * rz], dim=-1
    ).reshape(-1, 2, 3)
    cov2d = jac @ covar_c @ jac.transpose(1, 2)
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)

    a = cov2d[:, 0, 0] + eps2d
    b = 0.5 * (cov2d[:, 0, 1] + cov2d[:, 1, 0])
    c = cov2d[:, 1, 1] + eps2d
    det = a * c - b * b
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)

    with torch.no_grad():
        op = opacities.detach()
        extend = torch.sqrt(2.0 * torch.log(torch.clamp_min(op, ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extend = torch.clamp_max(extend, 3.33)
        radius_x = torch.ceil(extend * torch.sqrt(torch.clamp_min(a.detach(), 0)))
        radius_y = torch.ceil(extend * torch.sqrt(torch.clamp_min(c.detach(), 0)))
        mx, my = means2d.detach().unbind(-1)
        visible = (
            (z >= near_plane)
            & (z <= far_plane)
            & (det > 0)
            & (op >= ALPHA_THRESHOLD)
            & ((radius_x > 0) | (radius_y > 0))
            & (mx + radius_x > 0)
            & (mx - radius_x < width)
            & (my + radius_y > 0)
            & (my - radius_y < height)
        )
        radii = torch.stack([radius_x, radius_y], dim=-1).to(torch.int32)
        radii = torch.where(visible[:, None], radii, torch.zeros_like(radii))
    return Projection(means2d, conics, z, radii, visible)


def project_params(params: Mapping[str, Tensor], view: View) -> tuple[Projection, Tensor]:
    """The projection of raw 3DGS parameters (as renderers take them) for ``view``, and the
    activated opacities."""
    opacities = torch.sigmoid(params["opacities"])
    proj = project(
        params["means"],
        params["quats"],
        torch.exp(params["scales"]),
        opacities,
        view.viewmat,
        view.K,
        view.width,
        view.height,
    )
    return proj, opacities
