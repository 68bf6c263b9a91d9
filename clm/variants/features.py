"""3DGS with a learned feature vector per Gaussian, rendered alongside colour (as feature
fields, semantic splatting and similar variants do).

The whole variant is an attribute spec and a render function: ``features`` is a non-key
attribute, so it lives in pinned host memory with its Adam state and only the rows a view sees
move to the GPU, like the SH colours. Colour and features are composited in one rasterizer pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from clm.model.spec import AttributeSpec, GaussianSpec, gaussian_splatting_spec
from clm.render.base import RenderOutput, View
from clm.render.projection import project
from clm.render.sh import sh_to_rgb
from clm.render.splats import sh_coefficients
from clm.render.torch_rasterizer import rasterize


def feature_spec(dim: int, sh_degree: int = 3, lr: float = 2.5e-3) -> GaussianSpec:
    """Standard 3DGS attributes plus ``features [dim]`` (offloaded: not needed for culling)."""
    base = gaussian_splatting_spec(sh_degree)
    return GaussianSpec((*base.attributes, AttributeSpec("features", (dim,), lr)))


def render_features(
    params: Mapping[str, Tensor], view: View, sh_degree: int, background: Tensor
) -> RenderOutput:
    """An image of ``3 + dim`` channels: RGB, then the composited features (on black)."""
    means = params["means"]
    scales = torch.exp(params["scales"])
    opacities = torch.sigmoid(params["opacities"])
    rgb = sh_to_rgb(sh_degree, sh_coefficients(params, sh_degree), means - view.camera_center)
    colors = torch.cat([rgb, params["features"]], dim=1)
    full_bg = torch.cat([background, background.new_zeros(params["features"].shape[1])])
    if means.is_cuda:
        from gsplat import rasterization

        image, alpha, info = rasterization(
            means,
            params["quats"],
            scales,
            opacities,
            colors,
            view.viewmat[None],
            view.K[None],
            view.width,
            view.height,
            packed=True,
        )
        means2d = info["means2d"]
        if means2d.requires_grad:
            means2d.retain_grad()
        image = image[0] + (1.0 - alpha[0]) * full_bg  # as in render_gsplat
        return RenderOutput(image, alpha[0], means2d, info["radii"], info["gaussian_ids"].long())
    proj = project(
        means, params["quats"], scales, opacities, view.viewmat, view.K, view.width, view.height
    )
    ids = torch.nonzero(proj.visible).squeeze(1)
    means2d = proj.means2d.index_select(0, ids)
    if means2d.requires_grad:
        means2d.retain_grad()
    image, alpha = rasterize(
        means2d,
        proj.conics.index_select(0, ids),
        colors.index_select(0, ids),
        opacities.index_select(0, ids),
        proj.depths.index_select(0, ids),
        proj.radii.index_select(0, ids),
        view.width,
        view.height,
        full_bg,
    )
    return RenderOutput(image, alpha, means2d, proj.radii.index_select(0, ids), ids)
