"""The standard 3DGS renderer on both backends: gsplat's CUDA rasterizer, or ours in torch.

Both take the raw parameters of :func:`clm.model.spec.gaussian_splatting_spec` and apply the
activations themselves, so engines hand over exactly the tensors they optimise.

With ``depth=True`` (rendering only, never training) the image gets a fourth channel: the expected
camera-space z, sum(w_i z_i) / alpha with alpha = sum(w_i), 0 where alpha is 0 (gsplat's "ED").
It travels as a colour channel, so every engine, and the stitching of views rendered in pieces,
carries it without knowing about it. ``extra`` names per-Gaussian attributes (a variant's
features) composited the same way, after RGB and before depth, on a zero background.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from clm.render import native_raster
from clm.render.base import RenderFn, RenderOutput, View
from clm.render.projection import project_params
from clm.render.reach import REACH_GSPLAT, REACH_TORCH
from clm.render.sh import sh_to_rgb
from clm.render.torch_rasterizer import rasterize

#: The render input that holds ``sh0`` and the active ``shN`` bands side by side, ``[N, K, 3]``.
#: Engines that keep them adjacent in packed rows hand it over as a view (see
#: :class:`clm.offload.row_inputs.RowInputs`), which spares the renderers a copy of every row.
SH_COEFFS = "sh_coeffs"
JOINED_INPUTS = {SH_COEFFS: ("sh0", "shN")}


def sh_coefficients(
    params: Mapping[str, Tensor], sh_degree: int, ids: Tensor | None = None
) -> Tensor:
    """``[N, (d + 1)², 3]``: degree 0 and the active higher bands side by side, of rows ``ids``
    only when given (selected before they are joined: no copy of the other rows)."""
    bands = (sh_degree + 1) ** 2
    joined = params.get(SH_COEFFS)
    if joined is not None and joined.shape[1] >= bands:
        joined = joined[:, :bands]
        return joined if ids is None else joined.index_select(0, ids)
    sh0, shN = params["sh0"], params["shN"][:, : bands - 1]
    if ids is not None:
        sh0, shN = sh0.index_select(0, ids), shN.index_select(0, ids)
    return torch.cat([sh0, shN], dim=1)


def visible_colors(params: Mapping[str, Tensor], ids: Tensor, sh_degree: int, view: View) -> Tensor:
    """``[M, 3]`` RGB of rows ``ids`` seen from ``view``'s centre (the torch renderers')."""
    coeffs = sh_coefficients(params, sh_degree, ids)
    return sh_to_rgb(sh_degree, coeffs, params["means"].index_select(0, ids) - view.camera_center)


def gsplat_colors(
    params: Mapping[str, Tensor], sh_degree: int, view: View, ids: Tensor | None = None
) -> Tensor:
    """``[N, 3]`` RGB seen from ``view``'s centre through gsplat's SH kernel (CUDA), of rows
    ``ids`` only when given: the colours the gsplat renderers hand to the rasterizer."""
    from gsplat import spherical_harmonics

    means = params["means"] if ids is None else params["means"].index_select(0, ids)
    coeffs = sh_coefficients(params, sh_degree, ids)
    return torch.clamp_min(
        spherical_harmonics(sh_degree, means - view.camera_center, coeffs) + 0.5, 0.0
    )


def split_depth(image: Tensor) -> tuple[Tensor, Tensor]:
    """RGB ``[H, W, 3]`` and expected depth ``[H, W]`` of an image rendered with ``depth=True``."""
    return image[..., :3], image[..., 3]


def _expected_depth(image: Tensor, alpha: Tensor) -> Tensor:
    """The last channel (alpha-weighted z, background 0) divided by alpha, as gsplat does."""
    return torch.cat([image[..., :-1], image[..., -1:] / alpha.clamp_min(1e-10)], dim=-1)


def _extra_channels(
    params: Mapping[str, Tensor], extra: Sequence[str], background: Tensor
) -> tuple[Tensor | None, Tensor]:
    """The ``extra`` attributes side by side ``[N, D]`` (None without any), and the background
    padded with their zeros."""
    if not extra:
        return None, background
    values = torch.cat([params[name].reshape(params[name].shape[0], -1) for name in extra], 1)
    return values, torch.cat([background, background.new_zeros(values.shape[1])])


def render_torch(
    params: Mapping[str, Tensor],
    view: View,
    sh_degree: int,
    background: Tensor,
    depth: bool = False,
    extra: Sequence[str] = (),
) -> RenderOutput:
    """3DGS on the CPU (or as a reference on CUDA): the native rasterizer where it is built and
    takes the inputs (float32 on the CPU), else the pure-torch one; both composite the same.
    Both take any number of channels, so depth is z rasterized next to the colours."""
    proj, opacities = project_params(params, view)
    ids = torch.nonzero(proj.visible).squeeze(1)

    def visible(values: Tensor) -> Tensor:
        return values.index_select(0, ids)

    means2d = visible(proj.means2d)
    if means2d.requires_grad:
        means2d.retain_grad()
    colors = visible_colors(params, ids, sh_degree, view)
    features, background = _extra_channels(params, extra, background)
    if features is not None:
        colors = torch.cat([colors, visible(features)], dim=1)
    if depth:
        colors = torch.cat([colors, visible(proj.depths)[:, None]], dim=1)
        background = torch.cat([background, background.new_zeros(1)])
    raster = (
        native_raster.rasterize if native_raster.usable(means2d, colors, background) else rasterize
    )
    image, alpha = raster(
        means2d,
        visible(proj.conics),
        colors,
        visible(opacities),
        visible(proj.depths),
        visible(proj.radii),
        view.width,
        view.height,
        background,
    )
    if depth:
        image = _expected_depth(image, alpha)
    return RenderOutput(image, alpha, means2d, visible(proj.radii), ids)


def render_gsplat(
    params: Mapping[str, Tensor],
    view: View,
    sh_degree: int,
    background: Tensor,
    depth: bool = False,
    extra: Sequence[str] = (),
) -> RenderOutput:
    """3DGS through gsplat 1.5.3's CUDA rasterizer (packed mode: memory scales with visibility).

    The colours are evaluated here, for every row given, with gsplat's SH kernel: engines hand
    over the rows they culled in (or that pixels read), nearly all of which project, and then
    gsplat selects (and in backward scatters) 3 floats per projected row where its own SH path
    would move all 48 coefficients."""
    from gsplat import rasterization

    colors = gsplat_colors(params, sh_degree, view)
    features, background = _extra_channels(params, extra, background)
    if features is not None:
        colors = torch.cat([colors, features], dim=1)
    image, alpha, info = rasterization(
        means=params["means"],
        quats=params["quats"],
        scales=torch.exp(params["scales"]),
        opacities=torch.sigmoid(params["opacities"]),
        colors=colors,
        viewmats=view.viewmat[None],
        Ks=view.K[None],
        width=view.width,
        height=view.height,
        sh_degree=None,
        packed=True,
        render_mode="RGB+ED" if depth else "RGB",
    )
    means2d = info["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    # gsplat 1.5.3's packed mode rejects a per-camera background: composite it here (same sum).
    if depth:  # (its depth channel is already divided by alpha, and has no background)
        background = torch.cat([background, background.new_zeros(1)])
    image = image[0] + (1.0 - alpha[0]) * background
    return RenderOutput(image, alpha[0], means2d, info["radii"], info["gaussian_ids"].long())


# The rows each reads (:mod:`clm.render.reach`); the extra and depth channels are read for the
# same Gaussians.
render_gsplat.reach = REACH_GSPLAT  # type: ignore[attr-defined]
render_torch.reach = REACH_TORCH  # type: ignore[attr-defined]


def default_renderer(
    device: torch.device, depth: bool = False, extra: Sequence[str] = ()
) -> RenderFn:
    """gsplat on CUDA, the torch rasterizer elsewhere; ``depth`` adds the depth channel,
    ``extra`` the named attributes' channels."""
    render = render_gsplat if device.type == "cuda" else render_torch
    if not depth and not extra:
        return render
    with_channels = functools.partial(render, depth=depth, extra=tuple(extra))
    with_channels.reach = render.reach  # type: ignore[attr-defined]
    return with_channels
