"""3DGS with a learned feature vector per Gaussian, rendered alongside colour (as feature
fields, semantic splatting and similar variants do).

The whole variant is an attribute spec and the 3DGS renderer told to composite one more
attribute: ``features`` is a non-key attribute, so it lives in pinned host memory with its Adam
state and only the rows a view sees move to the GPU, like the SH colours. Colour and features
are composited in one rasterizer pass.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from clm.model.spec import AttributeSpec, GaussianSpec, gaussian_splatting_spec
from clm.render.base import RenderOutput, View
from clm.render.splats import render_gsplat, render_torch


def feature_spec(dim: int, sh_degree: int = 3, lr: float = 2.5e-3) -> GaussianSpec:
    """Standard 3DGS attributes plus ``features [dim]`` (offloaded: not needed for culling)."""
    base = gaussian_splatting_spec(sh_degree)
    return GaussianSpec((*base.attributes, AttributeSpec("features", (dim,), lr)))


def render_features(
    params: Mapping[str, Tensor], view: View, sh_degree: int, background: Tensor
) -> RenderOutput:
    """An image of ``3 + dim`` channels: RGB, then the composited features (on black)."""
    render = render_gsplat if params["means"].is_cuda else render_torch
    return render(params, view, sh_degree, background, extra=("features",))
