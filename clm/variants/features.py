"""3DGS with a learned feature vector per Gaussian, rendered alongside colour (as feature
fields, semantic splatting and similar variants do).

The whole variant is an attribute spec and a render function: ``features`` is a non-key
attribute, so it lives in pinned host memory with its Adam state and only the rows a view sees
move to the GPU, like the SH colours. Colour and features are composited in one rasterizer
pass, by the same splatting as 3DGS's (:func:`clm.render.splats.splat_torch`, ``splat_gsplat``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from clm.model.spec import AttributeSpec, GaussianSpec, gaussian_splatting_spec
from clm.render.base import RenderOutput, View
from clm.render.sh import sh_to_rgb
from clm.render.splats import sh_coefficients, splat_gsplat, splat_torch


def feature_spec(dim: int, sh_degree: int = 3, lr: float = 2.5e-3) -> GaussianSpec:
    """Standard 3DGS attributes plus ``features [dim]`` (offloaded: not needed for culling)."""
    base = gaussian_splatting_spec(sh_degree)
    return GaussianSpec((*base.attributes, AttributeSpec("features", (dim,), lr)))


def render_features(
    params: Mapping[str, Tensor], view: View, sh_degree: int, background: Tensor
) -> RenderOutput:
    """An image of ``3 + dim`` channels: RGB, then the composited features (on black)."""
    rgb = sh_to_rgb(
        sh_degree, sh_coefficients(params, sh_degree), params["means"] - view.camera_center
    )
    colors = torch.cat([rgb, params["features"]], dim=1)
    full_bg = torch.cat([background, background.new_zeros(params["features"].shape[1])])
    if colors.is_cuda:
        return splat_gsplat(params, view, colors, full_bg)
    return splat_torch(params, view, lambda ids, _: colors.index_select(0, ids), full_bg)
