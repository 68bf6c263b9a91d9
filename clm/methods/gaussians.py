"""3D Gaussian Splatting (Kerbl et al. 2023) as a method: the INRIA recipe.

Anisotropic 3D Gaussians with SH colour, initialised one per point, rendered by gsplat's EWA
rasterizer (or the CPU twin), trained on (1 - λ)·L1 + λ·D-SSIM, densified by splitting along
the Gaussian's own axes. The INRIA PLY is its file format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from clm.methods.base import Method
from clm.model.init import init_from_points
from clm.model.spec import GaussianSpec, gaussian_splatting_spec
from clm.render.base import RenderFn
from clm.render.projection import quat_to_rotmat
from clm.render.splats import default_renderer

SPLIT_SHRINK = 1.6  # children are this much smaller than their parent (the INRIA recipe)


def split_in_axes(
    means: Tensor, log_scales: Tensor, quats: Tensor, generator: torch.Generator, axes: int = 3
) -> tuple[Tensor, Tensor]:
    """Two children per parent, centred on samples of the parent's Gaussian and 1.6 times
    smaller: ``[2n, 3]`` positions and ``[2n, k]`` log-scales. ``axes`` is how many of the
    rotation's axes the Gaussian spans (3, or 2 for a flat splat, which stays in its plane)."""
    scales = torch.exp(log_scales)
    rot = quat_to_rotmat(quats)[:, :, :axes]
    noise = torch.randn(
        (2, means.shape[0], axes), generator=generator, device=means.device, dtype=means.dtype
    )
    offsets = torch.einsum("nij,nj,bnj->bni", rot, scales[:, :axes], noise)
    children = (means[None] + offsets).reshape(-1, 3)
    return children, torch.log(scales / SPLIT_SHRINK).repeat(2, 1)


@dataclasses.dataclass(frozen=True)
class GaussianSplatting(Method):
    """3DGS: the standard method (``--method 3dgs``)."""

    name = "3dgs"
    summary = "3D Gaussian Splatting (Kerbl et al. 2023), the INRIA recipe"
    split_reads = ("means", "scales", "quats")

    def spec(self, sh_degree: int) -> GaussianSpec:
        return gaussian_splatting_spec(sh_degree)

    def initial_params(
        self, spec: GaussianSpec, points: np.ndarray, colors: np.ndarray, init_opacity: float
    ) -> dict[str, Tensor]:
        return init_from_points(spec, points, colors, init_opacity=init_opacity)

    def renderer(
        self, device: torch.device, depth: bool = False, training: bool = False
    ) -> RenderFn:
        return default_renderer(device, depth)

    def split(
        self, spec: GaussianSpec, parents: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        means, scales = split_in_axes(
            parents["means"], parents["scales"], parents["quats"], generator
        )
        return {"means": means, "scales": scales}
