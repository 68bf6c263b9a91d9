"""Which Gaussians a 3DGS render reads the colour of, found from their geometry alone.

A pixel composites its Gaussians front to back and stops before one would take its
transmittance to 1e-4; one whose alpha is under 1/255 there is skipped. So the render reads
the colour (the SH rows, which the offload engine keeps in host memory) only of the Gaussians
some pixel composites, or stops at, and only those get any gradient. Walking the pixels with
the geometry alone finds them before any colour is fetched: the others can be left out of the
render, and the image and every gradient stay the same. In a large scene most culled-in
Gaussians are hidden behind others or too faint where they fall.

The sets found are supersets, by margins that cover a different rounding of alpha and the
order of depth ties (see ``kernels/reach.cu``), so a render from rows in another order reads
nothing outside them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from clm.render import native_raster
from clm.render.base import Reach, ReachFinder, View
from clm.render.projection import ALPHA_THRESHOLD, project_params
from clm.render.torch_rasterizer import (
    exclusive_segment_sum,
    pair_alpha,
    pixel_centers,
    pixel_pairs,
    segment_starts,
)

MARK_THRESHOLD = 0.9999 / 255.0  # marks alphas a compiler may round to either side of 1/255
STOP_T = 0.99e-4  # walks a little past the render's stop at 1e-4
TILE = 16


#: The attributes the walk reads: the geometry.
GEOMETRY = ("means", "quats", "scales", "opacities")


@torch.no_grad()
def reached_gsplat(params: Mapping[str, Tensor], view: View) -> Reach:
    """On CUDA: gsplat 1.5.3's projection and tile lists, as :func:`render_gsplat` makes them,
    walked by ``kernels/reach.cu``."""
    from gsplat.cuda._wrapper import fully_fused_projection, isect_offset_encode, isect_tiles

    from clm.offload.cuda_kernels import kernel, launch_blocks, pointer

    means = params["means"]
    drawn = torch.zeros(means.shape[0], dtype=torch.bool, device=means.device)
    reached = torch.zeros_like(drawn)
    opacities = torch.sigmoid(params["opacities"])
    _, camera_ids, gaussian_ids, radii, means2d, depths, conics, _ = fully_fused_projection(
        means,
        None,
        params["quats"],
        torch.exp(params["scales"]),
        view.viewmat[None],
        view.K[None],
        view.width,
        view.height,
        eps2d=0.3,
        packed=True,
        near_plane=0.01,
        far_plane=1e10,
        radius_clip=0.0,
        calc_compensations=False,
        opacities=opacities,
    )
    drawn.index_fill_(0, gaussian_ids, True)  # (no scalar copied to the GPU, no sync)
    if gaussian_ids.numel() == 0:
        return Reach(drawn, reached)
    tile_width, tile_height = math.ceil(view.width / TILE), math.ceil(view.height / TILE)
    _, isect_ids, flatten_ids = isect_tiles(
        means2d,
        radii,
        depths,
        TILE,
        tile_width,
        tile_height,
        packed=True,
        n_images=1,
        image_ids=camera_ids,
        gaussian_ids=gaussian_ids,
    )
    offsets = isect_offset_encode(isect_ids, 1, tile_width, tile_height).contiguous()
    marks = torch.zeros(gaussian_ids.numel(), dtype=torch.uint8, device=means.device)
    if flatten_ids.numel():
        tiles = tile_width * tile_height
        args = (
            pointer(means2d.contiguous()),
            pointer(conics.contiguous()),
            pointer(opacities.index_select(0, gaussian_ids).contiguous()),
            pointer(depths.contiguous()),
            pointer(offsets),
            pointer(flatten_ids.contiguous()),
            *(np.int32(v) for v in (flatten_ids.numel(), view.width, view.height)),
            *(np.int32(v) for v in (tile_width, tiles)),
            pointer(marks),
        )
        launch_blocks(kernel("reach.cu", "mark_reached"), tiles, (TILE, TILE), args)
    reached.index_put_((gaussian_ids,), marks.bool())  # each row once: packed, one camera
    return Reach(drawn, reached)


@torch.no_grad()
def reached_torch(params: Mapping[str, Tensor], view: View) -> Reach:
    """The same walk on the CPU renderers' projection: in C where the native rasterizer is
    built (:func:`clm.render.native_raster.reach`), else over the pure-torch rasterizer's
    (pixel, Gaussian) pairs (:func:`pairs_reached`)."""
    proj, opacities = project_params(params, view)
    ids = torch.nonzero(proj.visible).squeeze(1)
    reached = torch.zeros_like(proj.visible)
    if ids.numel() == 0:
        return Reach(proj.visible, reached)
    inputs = [t.index_select(0, ids) for t in (proj.means2d, proj.conics, opacities)]
    depths, radii = proj.depths.index_select(0, ids), proj.radii.index_select(0, ids)
    walk = native_raster.reach if native_raster.usable(*inputs, depths) else pairs_reached
    reached[ids[walk(*inputs, depths, radii, view.width, view.height)]] = True
    return Reach(proj.visible, reached)


def pairs_reached(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
) -> Tensor:
    """``[M]`` bool: the walk over (pixel, Gaussian) pairs in depth order, as
    :func:`clm.render.torch_rasterizer.rasterize` composites them."""
    pixel, gauss = pixel_pairs(means2d, radii, depths, width, height)
    per_pair = [t.index_select(0, gauss) for t in (means2d, conics, opacities)]
    centers = pixel_centers(pixel, width, means2d.dtype)
    alpha = pair_alpha(*per_pair, centers, threshold=MARK_THRESHOLD)
    marked = alpha > 0
    composited = alpha >= ALPHA_THRESHOLD
    log_t = torch.where(composited, torch.log1p(-alpha), torch.zeros_like(alpha))
    num_pixels = width * height
    before = exclusive_segment_sum(log_t, segment_starts(pixel, num_pixels))
    after = before + log_t.double()
    # The depth of the pair each pixel stops at: its ties are marked too.
    stops = composited & (after <= math.log(STOP_T))
    pair_depth = depths.index_select(0, gauss)
    stop_depth = torch.full((num_pixels,), math.inf, dtype=pair_depth.dtype, device=pixel.device)
    stop_depth = stop_depth.scatter_reduce(0, pixel[stops], pair_depth[stops], "amin")
    open_before = (before > math.log(STOP_T)) | (pair_depth == stop_depth.index_select(0, pixel))
    reached = torch.zeros(means2d.shape[0], dtype=torch.bool, device=means2d.device)
    reached[gauss[marked & open_before]] = True
    return reached


#: The reach of :func:`clm.render.splats.render_gsplat` and of ``render_torch``.
REACH_GSPLAT = ReachFinder(reached_gsplat, GEOMETRY)
REACH_TORCH = ReachFinder(reached_torch, GEOMETRY)
