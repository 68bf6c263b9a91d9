"""2D Gaussian Splatting (Huang et al. 2024) as a method: flat splats with depth and normals.

Each splat is a 2D Gaussian disc in 3D (two scales, a rotation whose third axis is the normal),
rendered by ray-splat intersection (gsplat's ``rasterization_2dgs`` on CUDA, the twin in
:mod:`clm.render.surfels` on the CPU). The recipe of the 2DGS reference code: (1 - λ)·L1 +
λ·D-SSIM, plus a normal-consistency term (rendered normals against normals from the rendered
depth) from 7000 images on, and the depth-distortion term from 3000 images on (weight 0 for
unbounded scenes, as the reference sets it; 1000 for object captures). Splats are culled with
the bound proven for flat splats, densified by the 2DGS screen-space gradient (the full sum,
see :mod:`clm.render.surfels`), split within their plane, and exported in the 2DGS reference
PLY layout (two ``scale_*`` columns).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from clm.methods.base import Method, photometric_loss, photometric_reach
from clm.methods.gaussians import split_in_axes
from clm.model.init import init_from_points
from clm.model.spec import CullRoles, GaussianSpec, gaussian_splatting_spec
from clm.render.base import RenderFn, RenderOutput, View
from clm.render.surfels import has_extras, normals_from_depth, split_extras, surfel_renderer


def surfel_spec(sh_degree: int = 3) -> GaussianSpec:
    """The attributes of 2DGS with the reference learning rates: 3DGS's, with two scales, and
    culled with the bound for flat splats."""
    flat = [
        dataclasses.replace(a, shape=(2,)) if a.name == "scales" else a
        for a in gaussian_splatting_spec(sh_degree)
    ]
    return GaussianSpec(tuple(flat), CullRoles(shape="surfel"))


@dataclasses.dataclass(frozen=True)
class Surfels(Method):
    """2DGS (``--method 2dgs``); intervals are in images, as the reference's iterations."""

    name = "2dgs"
    summary = "2D Gaussian Splatting (Huang et al. 2024): flat splats, depth and normals"
    split_reads = ("means", "scales", "quats")

    normal_weight: float = 0.05
    normal_from: int = 7000
    distortion_weight: float = 0.0
    distortion_from: int = 3000

    def spec(self, sh_degree: int) -> GaussianSpec:
        return surfel_spec(sh_degree)

    def initial_params(
        self, spec: GaussianSpec, points: np.ndarray, colors: np.ndarray, init_opacity: float
    ) -> dict[str, Tensor]:
        """As 3DGS (sized by the neighbours, 10% opaque), with random orientations: a splat's
        plane is learnt, and no orientation is a better guess than another."""
        params = init_from_points(spec, points, colors, init_opacity=init_opacity)
        generator = torch.Generator().manual_seed(0)
        n = params["means"].shape[0]
        params["quats"] = torch.rand((n, 4), generator=generator)
        return params

    def renderer(
        self, device: torch.device, depth: bool = False, training: bool = False
    ) -> RenderFn:
        extras = training and (self.normal_weight > 0 or self.distortion_weight > 0)
        return surfel_renderer(device, depth=depth, extras=extras)

    def normals(self, out: RenderOutput) -> Tensor | None:
        return split_extras(out.image)[2] if has_extras(out.image) else None

    def loss(self, out: RenderOutput, target: Tensor, view: View, images: int) -> Tensor:
        """The photometric loss, plus the normal and distortion terms once they are due."""
        fit = photometric_loss(out.image[..., :3], target, self.ssim_weight)
        total = fit
        if not has_extras(out.image):  # rendered without the extra channels
            return total
        _, depth, normals, distortion = split_extras(out.image)
        if self.normal_weight > 0 and images >= self.normal_from:
            surface = normals_from_depth(depth, view) * out.alpha.detach()
            consistency = 1.0 - (normals * surface).sum(-1)
            total = total + self.normal_weight * consistency.mean()
        if self.distortion_weight > 0 and images >= self.distortion_from:
            total = total + self.distortion_weight * distortion.mean()
        return total

    def loss_reach(self) -> int | None:
        """The photometric reach, or the normal term's: a normal from depth looks one pixel
        away, so a depth's gradient through the normals near it looks two."""
        if type(self).loss is not Surfels.loss:
            return None
        return max(photometric_reach(self.ssim_weight), 2)

    def split(
        self, spec: GaussianSpec, parents: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Children sampled within the parent's plane (along its two axes)."""
        means, scales = split_in_axes(
            parents["means"], parents["scales"], parents["quats"], generator, axes=2
        )
        return {"means": means, "scales": scales}
