"""Points on the city's surfaces as SfM gives them: an SfM-like sparse model.

Sparse points are surface points that the cameras see, coloured from the images, slightly
noisy, each with a track of the images that see it (the one it was sampled from first, then up
to a few more that pass a visibility ray test). Dense samples, straight from the geometry, are
in :mod:`clm.synthetic.surface`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clm.data.colmap import ColmapCamera, ColmapImage, ColmapModel, ColmapPoints, rotmat_to_qvec
from clm.synthetic.cameras import Intrinsics, View
from clm.synthetic.intersect import MISS
from clm.synthetic.raycast import RayCaster

POSITION_NOISE_PX = 0.1  # SfM point position noise, as a fraction of a pixel's footprint
DETECTION_NOISE_PX = 0.2  # keypoint noise of the extra track observations
COLOUR_NOISE = 2.0  # of 255
MAX_EXTRA_VIEWS = 5  # track length is at most 1 + this


@dataclass
class ViewSamples:
    """Points sampled through random pixels of one image."""

    uv: np.ndarray  # [k, 2] pixel coordinates (pixel centres)
    surface: np.ndarray  # [k, 3] float64 exact hit points
    xyz: np.ndarray  # [k, 3] float64 with SfM-like noise
    rgb: np.ndarray  # [k, 3] uint8


def pixel_directions(w2c: np.ndarray, intr: Intrinsics, uv: torch.Tensor) -> torch.Tensor:
    """World-space unit directions of the rays through pixel coordinates uv [N, 2]."""
    cam = torch.stack(
        [(uv[:, 0] - intr.cx) / intr.fx, (uv[:, 1] - intr.cy) / intr.fy, torch.ones_like(uv[:, 0])],
        -1,
    )
    d = cam @ torch.as_tensor(w2c[:3, :3], dtype=uv.dtype, device=uv.device)
    return d / d.norm(dim=-1, keepdim=True)


def sample_view(
    caster: RayCaster,
    view: View,
    intr: Intrinsics,
    image: np.ndarray,
    count: int,
    rng: np.random.Generator,
) -> ViewSamples:
    """Up to ``count`` surface points seen through random pixels of a rendered image [H, W, 3]."""
    tries = 3 * count + 16
    px = rng.integers(0, intr.width, tries)
    py = rng.integers(0, intr.height, tries)
    uv = np.stack([px, py], -1) + 0.5
    dirs = pixel_directions(
        view.world_to_camera, intr, torch.as_tensor(uv, dtype=torch.float32, device=caster.device)
    )
    hits = caster.trace_view(view.world_to_camera, intr, dirs)
    keep = np.flatnonzero((hits.kind != MISS).cpu().numpy())[:count]
    t = hits.t.cpu().numpy().astype(np.float64)[keep]
    d = dirs.cpu().numpy().astype(np.float64)[keep]
    surface = view.center + t[:, None] * d
    sigma = POSITION_NOISE_PX * t / intr.fx
    xyz = surface + rng.normal(size=surface.shape) * sigma[:, None]
    rgb = image[py[keep], px[keep]].astype(np.float64) + rng.normal(0, COLOUR_NOISE, (len(keep), 3))
    return ViewSamples(uv[keep], surface, xyz, np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _project(
    w2c: torch.Tensor, intr: Intrinsics, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates [..., 2] and depth [...] of points x [..., 3] seen by w2c [..., 4, 4]."""
    cam = (w2c[..., :3, :3] @ x.unsqueeze(-1)).squeeze(-1) + w2c[..., :3, 3]
    z = cam[..., 2]
    uv = torch.stack([intr.fx * cam[..., 0] / z + intr.cx, intr.fy * cam[..., 1] / z + intr.cy], -1)
    return uv, z


def _track_candidates(
    views: list[View], intr: Intrinsics, surface: torch.Tensor, source: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to MAX_EXTRA_VIEWS random other views per point that frame it at a similar scale and
    angle (a feature matcher would fail beyond that). Returns (point, view) index pairs."""
    dev = surface.device
    w2c = torch.as_tensor(
        np.stack([v.world_to_camera for v in views]), dtype=torch.float64, device=dev
    )
    centres = torch.as_tensor(np.stack([v.center for v in views]), device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    per = max(2**22 // len(views), 1)
    points, cams = [], []
    for start in range(0, len(surface), per):
        x, src = surface[start : start + per], source[start : start + per]
        uv, z = _project(w2c[None], intr, x[:, None])  # [P, N]
        inside = (z > 0.1) & (uv[..., 0] >= 0) & (uv[..., 0] < intr.width)
        inside &= (uv[..., 1] >= 0) & (uv[..., 1] < intr.height)
        ray = x[:, None] - centres[None]  # [P, N, 3]
        dist = ray.norm(dim=-1)
        ref = dist.gather(1, src[:, None])
        cos = (ray * ray.gather(1, src[:, None, None].expand(-1, 1, 3))).sum(-1) / (dist * ref)
        ok = inside & (dist < 3 * ref) & (dist > ref / 3) & (cos > 0.5)
        ok[torch.arange(len(x), device=dev), src] = False
        score = torch.where(ok, torch.rand(ok.shape, generator=gen, device=dev), -1.0)
        k = min(MAX_EXTRA_VIEWS, len(views))
        best, which = score.topk(k, dim=1)
        p_idx = torch.arange(start, start + len(x), device=dev)[:, None].expand(-1, k)
        points.append(p_idx[best >= 0])
        cams.append(which[best >= 0])
    return torch.cat(points), torch.cat(cams)


def build_sparse_model(
    caster: RayCaster, views: list[View], intr: Intrinsics, samples: list[ViewSamples], seed: int
) -> ColmapModel:
    """COLMAP model of the sampled points, with tracks verified by visibility rays."""
    rng = np.random.default_rng([seed, 0x7EAC])
    dev = caster.device
    source = np.concatenate([np.full(len(s.uv), i) for i, s in enumerate(samples)]).astype(np.int64)
    surface = np.concatenate([s.surface for s in samples]).reshape(-1, 3)
    xyz = np.concatenate([s.xyz for s in samples]).reshape(-1, 3)
    rgb = np.concatenate([s.rgb for s in samples]).reshape(-1, 3)
    obs_point = [np.arange(len(source))]
    obs_image = [source]
    obs_uv = [np.concatenate([s.uv for s in samples]).reshape(-1, 2)]
    if len(source) and len(views) > 1:
        pts, cams = _track_candidates(
            views,
            intr,
            torch.as_tensor(surface, device=dev),
            torch.as_tensor(source, device=dev),
            seed,
        )
        pts, cams = pts.cpu().numpy(), cams.cpu().numpy()
        order = np.argsort(cams, kind="stable")
        pts, cams = pts[order], cams[order]
        bounds = np.searchsorted(cams, np.arange(len(views) + 1))
        for j, view in enumerate(views):
            p = pts[bounds[j] : bounds[j + 1]]
            if len(p) == 0:
                continue
            ray = surface[p] - view.center
            dist = np.linalg.norm(ray, axis=1)
            hits = caster.trace_view(
                view.world_to_camera, intr, torch.as_tensor(ray, dtype=torch.float32, device=dev)
            )
            t = hits.t.cpu().numpy()
            seen = np.abs(t - dist) < 0.01 * dist + 0.05
            p = p[seen]
            w2c = torch.as_tensor(view.world_to_camera)
            uv, _ = _project(w2c, intr, torch.as_tensor(surface[p]))
            uv = uv.numpy() + rng.normal(0, DETECTION_NOISE_PX, (len(p), 2))
            obs_point.append(p)
            obs_image.append(np.full(len(p), j))
            obs_uv.append(uv)
    return _assemble(views, intr, xyz, rgb, obs_point, obs_image, obs_uv)


def _assemble(
    views: list[View],
    intr: Intrinsics,
    xyz: np.ndarray,
    rgb: np.ndarray,
    obs_point: list[np.ndarray],
    obs_image: list[np.ndarray],
    obs_uv: list[np.ndarray],
) -> ColmapModel:
    """Number the observations per image and lay the tracks out in CSR order (source first)."""
    point, image = np.concatenate(obs_point), np.concatenate(obs_image)
    uv = np.concatenate(obs_uv).reshape(-1, 2)
    extra = np.concatenate(
        [np.zeros(len(obs_point[0]), bool)] + [np.ones(len(p), bool) for p in obs_point[1:]]
    )
    by_image = np.lexsort((point, image))
    starts = np.searchsorted(image[by_image], np.arange(len(views) + 1))
    slot = np.empty(len(point), np.int64)
    slot[by_image] = np.arange(len(point)) - starts[image[by_image]]

    w2c = torch.as_tensor(np.stack([v.world_to_camera for v in views])) if views else None
    errors = np.zeros(len(xyz))
    if len(point):
        proj, _ = _project(w2c[image], intr, torch.as_tensor(xyz[point]))
        err = np.linalg.norm(proj.numpy() - uv, axis=1)
        errors = np.bincount(point, err, len(xyz)) / np.maximum(
            np.bincount(point, minlength=len(xyz)), 1
        )

    images = {}
    for j, view in enumerate(views):
        rows = by_image[starts[j] : starts[j + 1]]
        rot, trans = view.world_to_camera[:3, :3], view.world_to_camera[:3, 3]
        images[j + 1] = ColmapImage(
            id=j + 1,
            qvec=rotmat_to_qvec(rot),
            tvec=trans.copy(),
            camera_id=1,
            name=view.name,
            xys=uv[rows].astype(np.float64),
            point3d_ids=point[rows].astype(np.int64) + 1,
        )
    by_point = np.lexsort((image, extra, point))
    points = ColmapPoints(
        ids=np.arange(1, len(xyz) + 1, dtype=np.int64),
        xyz=xyz.astype(np.float64),
        rgb=rgb.astype(np.uint8),
        errors=errors,
        track_lengths=np.bincount(point, minlength=len(xyz)).astype(np.int64),
        track_image_ids=(image[by_point] + 1).astype(np.int32),
        track_point2d_idx=slot[by_point].astype(np.int32),
    )
    params = np.array([intr.fx, intr.fy, intr.cx, intr.cy], np.float64)
    camera = ColmapCamera(1, "PINHOLE", intr.width, intr.height, params)
    return ColmapModel(cameras={1: camera}, images=images, points=points)
