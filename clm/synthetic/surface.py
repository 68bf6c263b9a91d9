"""Points spread uniformly by area over the city's visible surfaces, with their lit colours:
the dense initial model of ``clm-synth --dense``, the large models of ``tools/bench.py``.

The quad table, its areas and the ray caster are built once per sampler, and every draw is a
few large batches of tensor ops on the sampler's device (no per-point Python), so a hundred
million points take minutes on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from clm.data.types import Similarity
from clm.render.sh import rgb_to_sh0
from clm.synthetic.geometry import CityGeometry
from clm.synthetic.intersect import BOX, GROUND, SPHERE, Hits
from clm.synthetic.raycast import RayCaster
from clm.synthetic.shading import hit_surface, shade

# Candidates drawn at once; the caster chunks its own work within its memory budget.
_CUDA_BATCH, _CPU_BATCH = 1 << 23, 1 << 16
_PROBE = {"cuda": 1 << 22, "cpu": 1 << 15}  # draws that estimate the visible share of the area


class SurfaceSampler:
    """Draws area-uniform points on the ground, box faces and tree spheres, rejecting those
    hidden inside another primitive (a wall against a neighbour, ground under a building)."""

    def __init__(self, geometry: CityGeometry, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.caster = RayCaster(geometry, self.device)
        quads = _quads(geometry)
        radii = geometry.spheres[:, 3].astype(np.float64)
        areas = np.concatenate(
            [np.linalg.norm(np.cross(quads[:, 3:6], quads[:, 6:9]), axis=1), 4 * np.pi * radii**2]
        )
        self.total_area = float(areas.sum())
        self.quads = torch.as_tensor(quads, dtype=torch.float32, device=self.device)
        self.cdf = torch.as_tensor(np.cumsum(areas), device=self.device)
        self.batch = _CUDA_BATCH if self.device.type == "cuda" else _CPU_BATCH
        self.acceptance = 1.0  # share of draws that are not hidden, refined as draws come in

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def visible_area(self, gen: torch.Generator) -> float:
        """Square metres of visible surface: the total times the share of draws kept."""
        probe = _PROBE["cuda" if self.device.type == "cuda" else "cpu"]
        kept = sum(
            len(self._draw(min(self.batch, probe - start), gen)[0])
            for start in range(0, probe, self.batch)
        )
        return self.total_area * kept / probe

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` points [n, 3] float32 and their colours [n, 3] in [0, 1] as the images show
        them (sunlight and shadows, no haze), on the sampler's device."""
        xyz, rgb, have = [], [], 0
        while have < n:
            m = min(self.batch, int((n - have) / self.acceptance * 1.05) + 256)
            p, normal, kind, index = self._draw(m, gen)
            take = min(len(p), n - have)
            p, normal, kind, index = p[:take], normal[:take], kind[:take], index[:take]
            hits = Hits(torch.full((take,), 0.01, device=self.device), kind, index)
            _, normal, albedo = hit_surface(self.caster.ct, p + 0.01 * normal, -normal, hits)
            xyz.append(p)
            rgb.append(shade(self.caster, p, normal, albedo).clamp(0, 1))
            have += take
        if not xyz:
            return torch.zeros(0, 3, device=self.device), torch.zeros(0, 3, device=self.device)
        return torch.cat(xyz), torch.cat(rgb)

    def _draw(
        self, m: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Of ``m`` area-uniform draws, the visible ones: points, normals, kinds, indices."""
        dev, nq = self.device, len(self.quads)
        area = torch.rand(m, dtype=torch.float64, generator=gen, device=dev) * self.total_area
        pick = torch.searchsorted(self.cdf, area, right=True).clamp(max=len(self.cdf) - 1)
        on_sphere = pick >= nq
        q = self.quads[pick.clamp(max=nq - 1)]
        uv = torch.rand(m, 2, generator=gen, device=dev)
        p = q[:, :3] + uv[:, :1] * q[:, 3:6] + uv[:, 1:] * q[:, 6:9]
        g = torch.randn(m, 3, generator=gen, device=dev)
        g = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
        s = self.caster.ct.spheres[(pick - nq).clamp(min=0)]
        p = torch.where(on_sphere[:, None], s[:, :3] + g * s[:, 3:], p)
        normal = torch.where(on_sphere[:, None], g, q[:, 9:12])
        face = q[:, 12].long()
        kind = torch.where(on_sphere, SPHERE, torch.where(face < 0, GROUND, BOX))
        index = torch.where(on_sphere, pick - nq, face)
        keep = ~self.caster.inside(p + 0.03 * normal)
        self.acceptance = max(float(keep.float().mean()), 0.01)
        return p[keep], normal[keep], kind[keep], index[keep]


def sample_surface_points(
    geometry: CityGeometry, n: int, seed: int, *, device: str | torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points on the visible surfaces, uniform by area: xyz float32 [n, 3] and their
    colours in the images, rgb uint8 [n, 3]. The same seed on one device type gives the same
    points."""
    sampler = SurfaceSampler(geometry, device)
    xyz, rgb = sampler.sample(n, sampler.generator(seed))
    return xyz.cpu().numpy(), (rgb * 255 + 0.5).to(torch.uint8).cpu().numpy()


def surface_params(
    geometry: CityGeometry,
    n: int,
    *,
    seed: int = 0,
    chunk: int = 1 << 22,
    num_rest: int = 0,
    to_train: Similarity | None = None,
    device: str | torch.device | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """``n`` Gaussians on the surfaces, yielded ``chunk`` at a time as CPU tensors (never all
    of them at once): a dense initial model without SfM.

    Isotropic, with the log-scale of the mean spacing of ``n`` points over the visible area,
    identity rotations, opacity 0.5, the surface colour as SH degree 0 and ``num_rest`` zero
    coefficients per channel above it. Positions are in the scene's world frame (the COLMAP
    model's), or in the training frame when ``to_train`` is given.
    """
    sampler = SurfaceSampler(geometry, device)
    gen = sampler.generator(seed)
    spacing = math.sqrt(sampler.visible_area(gen) / max(n, 1))
    if to_train is not None:
        spacing *= to_train.scale
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        xyz, rgb = sampler.sample(m, gen)
        if to_train is not None:
            centre = torch.as_tensor(to_train.center, dtype=torch.float64, device=xyz.device)
            xyz = ((xyz.double() - centre) * to_train.scale).float()
        yield {
            "means": xyz.cpu(),
            "scales": torch.full((m, 3), math.log(spacing)),
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(m, 1),
            "opacities": torch.zeros(m),
            "sh0": rgb_to_sh0(rgb).cpu()[:, None],
            "shN": torch.zeros(m, num_rest, 3),
        }


def _quads(geometry: CityGeometry) -> np.ndarray:
    """Planar patches as rows (origin, edge1, edge2, normal, box id or -1 for the ground)."""
    x0, y0, x1, y1 = geometry.ground
    ground = np.array([[x0, y0, 0, x1 - x0, 0, 0, 0, y1 - y0, 0, 0, 0, 1, -1]])
    b = geometry.boxes.astype(np.float64)
    lo, hi, ids = b[:, :3], b[:, 3:], np.arange(len(b), dtype=np.float64)
    w, d, h = (hi - lo).T
    zero, one = np.zeros(len(b)), np.ones(len(b))

    def faces(origin: np.ndarray, e1: list, e2: list, normal: list) -> np.ndarray:
        return np.column_stack([origin, *e1, *e2, *normal, ids])

    roof = faces(
        np.column_stack([lo[:, :2], hi[:, 2]]), [w, zero, zero], [zero, d, zero], [zero, zero, one]
    )
    west = faces(lo, [zero, d, zero], [zero, zero, h], [-one, zero, zero])
    east = faces(
        np.column_stack([hi[:, 0], lo[:, 1:]]), [zero, d, zero], [zero, zero, h], [one, zero, zero]
    )
    south = faces(lo, [w, zero, zero], [zero, zero, h], [zero, -one, zero])
    north = faces(
        np.column_stack([lo[:, 0], hi[:, 1], lo[:, 2]]),
        [w, zero, zero],
        [zero, zero, h],
        [zero, one, zero],
    )
    return np.concatenate([ground, roof, west, east, south, north])
