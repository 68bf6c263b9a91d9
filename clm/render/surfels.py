"""2D Gaussian splatting ("surfels", 2DGS) on both backends: gsplat 1.5.3's CUDA rasterizer, or
ours in torch, which reproduces its forward pass and differentiates it with autograd.

Parameters are raw, as the 2DGS attribute spec names them: ``means [N, 3]``, ``scales [N, 2]``
(log of the two in-plane scales; a third column, if present, is ignored, as gsplat's 2DGS kernels
ignore it), ``quats [N, 4]`` (wxyz, unnormalised), ``opacities [N]`` (logit), ``sh0 [N, 1, 3]``
and ``shN [N, K, 3]``.

What a surfel does to a pixel (gsplat's ``Projection2DGSPacked.cu`` and
``RasterizeToPixels2DGSFwd.cu``):

* The splat's plane is mapped to the image by ``T = K [s_u t_u, s_v t_v, p]`` (3×3; ``t_u, t_v``
  its tangent axes and ``p`` its centre, in camera space). The pixel centre ``(x, y)`` (integer
  + 0.5) meets the plane at ``(u, v) = (c_0 / c_2, c_1 / c_2)`` with
  ``c = (x T_2 - T_0) × (y T_2 - T_1)`` (``T_i`` the rows of ``T``); no hit when ``c_2 = 0``.
* Low-pass filter: the exponent is ``min(u² + v², 2 |m - (x, y)|²)``, i.e. the larger of the
  surfel's own Gaussian and an isotropic screen-space Gaussian of variance 0.5 px² around ``m``,
  the centre of the screen box of the splat's 1σ ellipse (not, in general, the projection of
  ``p``); alpha = ``min(0.999, opacity · exp(-exponent / 2))``, skipped below 1/255.
* A pixel composites front to back in the order of the centres' camera z, stopping before the
  splat that would take its transmittance to 1e-4 or below. Splats are drawn where their centre
  z is within [0.01, 1e10] and their box ``m ± ceil(3.33 · 1σ half-extent)`` meets the image;
  opacity culls nothing (nor does gsplat's ``eps2d``, which its packed 2DGS projection does
  not take). A splat reaches every pixel of the 16×16 tiles its box touches, and no other; the
  twin (:mod:`clm.render.surfel_raster`) pairs it with those of them that alpha ≥ 1/255 can
  reach, so its memory and time scale with the (pixel, splat) pairs of each splat's footprint.
* Normals are the splat axis ``t_u × t_v`` turned to face the camera (``n · p < 0``).

The image: ``[H, W, 3]`` RGB composited over ``background``; ``depth=True`` appends the expected
depth (sum(w_i z_i) / alpha, 0 where alpha is 0, as in :mod:`clm.render.splats`). ``extras=True``
gives the 2DGS regularisers' inputs, so the layout is, whether or not ``depth`` is also asked::

    [..., 0:3]  RGB over the background
    [..., 3]    expected depth (as above; no background)
    [..., 4:7]  rendered normal, world frame: sum(w_i n_i), not renormalised, so its length is
                alpha (gsplat's ``render_normals``); no background
    [..., 7]    distortion, sum over i > j of 2 w_i w_j (z_i - z_j) (gsplat's ``render_distort``)

(:data:`EXTRA_CHANNELS` = 5 channels after RGB; :func:`split_extras` takes them apart). The
normal-consistency term compares channels 4:7 with :func:`normals_from_depth` of channel 3.

``RenderOutput.means2d`` holds the box centres ``m``; its ``.grad`` after backward is the 2DGS
densification signal: per splat ``(∂L/∂T[0, 2], ∂L/∂T[1, 2]) · T[2, 2]``, the loss gradient with
respect to the splat's image position (through the ray-plane intersection only, the 2DGS
paper's "projected gradient of the 3D centre"). gsplat 1.5.3 computes this quantity as
``gradient_2dgs``, but reads the atomically accumulated ``∂L/∂T`` while other threads are still
adding to it; both backends here instead add a zero ``(means2d - means2d) · T[2, 2]`` to
``T[:2, 2]`` and let autograd deliver the full sum, the same on both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clm.render.base import RenderFn, RenderOutput, View
from clm.render.projection import quat_to_rotmat
from clm.render.splats import gsplat_colors, visible_colors
from clm.render.surfel_raster import TILE_SIZE, rasterize_surfels

EXTRA_CHANNELS = 5  # expected depth, normal (3), distortion: the channels after RGB
NEAR_PLANE, FAR_PLANE = 0.01, 1e10
BOX_SIGMAS = 3.33


def has_extras(image: Tensor) -> bool:
    """Whether ``image`` was rendered with ``extras=True``."""
    return image.shape[-1] == 3 + EXTRA_CHANNELS


def split_extras(image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RGB ``[H, W, 3]``, expected depth ``[H, W]``, normals ``[H, W, 3]`` and distortion
    ``[H, W]`` of an image rendered with ``extras=True`` (with or without ``depth``: the
    depth channel is shared)."""
    if image.shape[-1] != 3 + EXTRA_CHANNELS:
        raise ValueError(f"expected {3 + EXTRA_CHANNELS} channels, got {image.shape[-1]}")
    return image[..., :3], image[..., 3], image[..., 4:7], image[..., 7]


def normals_from_depth(depth: Tensor, view: View) -> Tensor:
    """World-frame unit normals ``[H, W, 3]`` of the surface a z-depth map ``[H, W]`` describes.

    Each pixel centre is lifted to its 3D point; the normal is the cross product of the central
    differences down the rows and across the columns (the 2DGS recipe, gsplat's
    ``depth_to_normal``), which faces the camera; border pixels, and pixels whose neighbours do
    not span a plane, are zero. Differentiable in ``depth``.
    """
    height, width = depth.shape
    K = view.K.to(depth.dtype)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    xs = (torch.arange(width, device=depth.device, dtype=depth.dtype) + 0.5 - cx) / fx
    ys = (torch.arange(height, device=depth.device, dtype=depth.dtype) + 0.5 - cy) / fy
    rays = torch.stack(
        [xs.expand(height, width), ys[:, None].expand(height, width), torch.ones_like(depth)],
        dim=-1,
    )
    rot, trans = view.viewmat[:3, :3].to(depth.dtype), view.viewmat[:3, 3].to(depth.dtype)
    points = (rays * depth[..., None] - trans) @ rot  # world = Rᵀ (camera - t)
    down = points[2:, 1:-1] - points[:-2, 1:-1]
    across = points[1:-1, 2:] - points[1:-1, :-2]
    normals = F.normalize(torch.linalg.cross(down, across, dim=-1), dim=-1)
    return F.pad(normals, (0, 0, 1, 1, 1, 1))


@dataclass
class _Projection:
    """Every row's surfel in screen space; ``visible`` marks the ones gsplat would draw."""

    transforms: Tensor  # [N, 3, 3] T = K [s_u t_u, s_v t_v, p]
    means2d: Tensor  # [N, 2] centre of the 1σ ellipse's screen box
    depths: Tensor  # [N] camera z of the centre
    normals: Tensor  # [N, 3] camera frame, facing the camera
    radii: Tensor  # [N, 2] int32 (0 where not visible)
    visible: Tensor  # [N] bool


def _project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
) -> _Projection:
    """Activated surfels (``scales [N, 2]`` through exp) seen by one camera."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    centres_c = means @ rot.T + trans
    axes = rot @ quat_to_rotmat(quats)  # [N, 3, 3]: columns t_u, t_v, normal (camera frame)
    tangents = axes[:, :, :2] * scales[:, None, :2]
    transforms = K @ torch.cat([tangents, centres_c[:, :, None]], dim=2)
    normals = axes[:, :, 2]
    facing = (normals * centres_c).sum(-1) < 0
    normals = torch.where(facing[:, None], normals, -normals)

    # Screen box of the 1σ ellipse: the dual conic T diag(1, 1, -1) Tᵀ gives its centre and its
    # half-extents; where that is degenerate (distance 0) the splat is not drawn.
    sign = transforms.new_tensor([1.0, 1.0, -1.0])
    row_u, row_v, row_w = transforms.unbind(1)
    distance = (row_w * row_w * sign).sum(-1)
    ok = distance != 0
    f = sign / torch.where(ok, distance, torch.ones_like(distance))[:, None]
    means2d = torch.stack([(f * row_u * row_w).sum(-1), (f * row_v * row_w).sum(-1)], dim=-1)
    depths = centres_c[:, 2]
    with torch.no_grad():
        extent2 = means2d**2 - torch.stack([(f * row_u**2).sum(-1), (f * row_v**2).sum(-1)], -1)
        radii = torch.ceil(BOX_SIGMAS * torch.sqrt(torch.clamp_min(extent2, 1e-4)))
        (mx, my), (rx, ry) = means2d.unbind(-1), radii.unbind(-1)
        visible = (
            ok
            & (depths >= NEAR_PLANE)
            & (depths <= FAR_PLANE)
            & torch.isfinite(means2d).all(-1)
            & (mx + rx > 0)
            & (mx - rx < width)
            & (my + ry > 0)
            & (my - ry < height)
        )
        radii = torch.where(visible[:, None], radii, torch.zeros_like(radii)).to(torch.int32)
    return _Projection(transforms, means2d, depths, normals, radii, visible)


def _densification_probe(means2d: Tensor, transforms: Tensor) -> tuple[Tensor, Tensor]:
    """A leaf with the values of ``means2d`` whose gradient is ``∂L/∂T[:2, 2] · T[2, 2]``
    (it enters ``T[:2, 2]`` as an exact zero), and the transforms it enters."""
    probe = means2d.detach().clone()
    if not (torch.is_grad_enabled() and transforms.requires_grad):
        return probe, transforms
    probe.requires_grad_(True)
    shift = (probe - probe.detach()) * transforms[:, 2, 2:3].detach()  # [M, 2], zeros
    return probe, transforms + F.pad(shift[:, :, None], (2, 0, 0, 1))


def _assemble(
    colors: Tensor,
    alpha: Tensor,
    depth_sum: Tensor | None,
    normals: Tensor | None,
    distort: Tensor | None,
    view: View,
    background: Tensor,
    depth: bool,
    extras: bool,
) -> Tensor:
    """The output image from the composited parts (see the module docstring for the layout)."""
    channels = [colors + (1.0 - alpha) * background]
    if depth or extras:
        assert depth_sum is not None
        channels.append(depth_sum / alpha.clamp_min(1e-10))
    if extras:
        assert normals is not None and distort is not None
        rot = view.viewmat[:3, :3].to(normals.dtype)
        channels += [normals @ rot, distort]  # camera → world: Rᵀ n, as row vectors n R
    return torch.cat(channels, dim=-1) if len(channels) > 1 else channels[0]


def render_surfels_torch(
    params: Mapping[str, Tensor],
    view: View,
    sh_degree: int,
    background: Tensor,
    depth: bool = False,
    extras: bool = False,
) -> RenderOutput:
    """2DGS in pure torch (CPU, or as a reference on CUDA), gsplat's forward pass pair by pair;
    memory and time scale with the (pixel, splat) pairs of the tiles each splat touches."""
    means = params["means"]
    proj = _project(
        means,
        params["quats"],
        torch.exp(params["scales"][:, :2]),
        view.viewmat,
        view.K,
        view.width,
        view.height,
    )
    ids = torch.nonzero(proj.visible).squeeze(1)

    def visible(values: Tensor) -> Tensor:
        return values.index_select(0, ids)

    centres, radii, depths = visible(proj.means2d), visible(proj.radii), visible(proj.depths)
    means2d, transforms = _densification_probe(centres, visible(proj.transforms))
    if means2d.requires_grad:
        means2d.retain_grad()
    features = [visible_colors(params, ids, sh_degree, view)]
    if depth or extras:
        features.append(depths[:, None])
    if extras:
        features.append(visible(proj.normals))
    composite, alpha, distort = rasterize_surfels(
        centres,
        transforms,
        torch.sigmoid(visible(params["opacities"])),
        torch.cat(features, dim=1),
        depths,
        radii,
        view.width,
        view.height,
        distortion=extras,
    )
    image = _assemble(
        composite[..., :3],
        alpha,
        composite[..., 3:4] if depth or extras else None,
        composite[..., 4:7] if extras else None,
        distort,
        view,
        background,
        depth,
        extras,
    )
    return RenderOutput(image, alpha, means2d, radii, ids)


def render_surfels_gsplat(
    params: Mapping[str, Tensor],
    view: View,
    sh_degree: int,
    background: Tensor,
    depth: bool = False,
    extras: bool = False,
) -> RenderOutput:
    """2DGS through gsplat 1.5.3's CUDA kernels in packed mode (memory scales with visibility).

    The stages of ``rasterization_2dgs`` called one by one: so that the densification probe can
    enter the ray transforms (see the module docstring), because that function's packed mode
    does not pack SH colours in 1.5.3, and so that no unused depth normals are made. The
    background is composited here (the extra channels get none).
    """
    from gsplat import (
        fully_fused_projection_2dgs,
        isect_offset_encode,
        isect_tiles,
        rasterize_to_pixels_2dgs,
    )

    means = params["means"]
    width, height = view.width, view.height
    scales = torch.exp(params["scales"][:, :2])
    scales = torch.cat([scales, torch.ones_like(scales[:, :1])], dim=1)  # 3rd: read by nothing
    _, camera_ids, gaussian_ids, radii, centres, depths, transforms, normals = (
        fully_fused_projection_2dgs(
            means,
            params["quats"],
            scales,
            view.viewmat[None],
            view.K[None],
            width,
            height,
            near_plane=NEAR_PLANE,
            far_plane=FAR_PLANE,
            packed=True,
        )
    )
    ids = gaussian_ids.long()
    means2d, probed = _densification_probe(centres, transforms)
    if means2d.requires_grad:
        means2d.retain_grad()
    colors = gsplat_colors(params, sh_degree, view, ids)
    if depth or extras:  # the kernels read the last channel as depth (distortion)
        colors = torch.cat([colors, depths[:, None]], dim=1)

    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    _, isect_ids, flatten_ids = isect_tiles(
        centres,
        radii,
        depths,
        TILE_SIZE,
        tiles_x,
        tiles_y,
        packed=True,
        n_images=1,
        image_ids=camera_ids,
        gaussian_ids=gaussian_ids,
    )
    offsets = isect_offset_encode(isect_ids, 1, tiles_x, tiles_y)
    composite, alpha, normal_image, distort, _ = rasterize_to_pixels_2dgs(
        centres,
        probed,
        colors,
        torch.sigmoid(params["opacities"]).index_select(0, ids),
        normals,
        torch.zeros_like(centres),  # gsplat's own densify slot: left without gradient
        width,
        height,
        TILE_SIZE,
        offsets,
        flatten_ids,
        packed=True,
    )
    composite, alpha = composite[0], alpha[0]
    image = _assemble(
        composite[..., :3],
        alpha,
        composite[..., 3:4] if depth or extras else None,
        normal_image[0] if extras else None,
        distort[0] if extras else None,
        view,
        background,
        depth,
        extras,
    )
    return RenderOutput(image, alpha, means2d, radii, ids)


def surfel_renderer(device: torch.device, depth: bool = False, extras: bool = False) -> RenderFn:
    """gsplat on CUDA, the torch twin elsewhere; ``depth`` and ``extras`` add their channels."""
    render = render_surfels_gsplat if device.type == "cuda" else render_surfels_torch
    if depth or extras:
        return functools.partial(render, depth=depth, extras=extras)
    return render
