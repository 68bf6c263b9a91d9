"""Colour of ray-cast hits: surface albedo, Lambert sunlight with a hard shadow ray, a sky
ambient term, and aerial haze towards the horizon colour; the sky gradient for misses."""

from __future__ import annotations

import torch

from clm.synthetic.geometry import SKY_HORIZON
from clm.synthetic.intersect import BOX, GROUND, MISS, SPHERE, Hits
from clm.synthetic.materials import CityTensors, box_albedo, ground_albedo, sky, sphere_albedo
from clm.synthetic.raycast import RayCaster

SHADOW_OFFSET = 0.02  # metres a shadow ray starts off its surface, against self-hits
AMBIENT, SUN = 0.42, 0.78


def hit_surface(
    ct: CityTensors, o: torch.Tensor, d: torch.Tensor, hits: Hits
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point, unit normal and albedo of each hit (rays [N, 3], every one a hit)."""
    p = o + hits.t[:, None] * d
    normal = torch.zeros_like(p)
    albedo = torch.zeros_like(p)
    ground = hits.kind == GROUND
    normal[ground, 2] = 1.0
    albedo[ground] = ground_albedo(ct, p[ground, 0], p[ground, 1])
    box = hits.kind == BOX
    if box.any():
        ids, pb = hits.index[box], p[box]
        b = ct.boxes[ids]
        face = torch.cat([(pb - b[:, :3]).abs(), (pb - b[:, 3:]).abs()], -1).argmin(-1)
        axis = face % 3
        nb = torch.zeros_like(pb)
        nb[torch.arange(len(pb), device=p.device), axis] = torch.where(face < 3, -1.0, 1.0)
        normal[box] = nb
        albedo[box] = box_albedo(ct, pb, axis, ids)
    sphere = hits.kind == SPHERE
    if sphere.any():
        ids, ps = hits.index[sphere], p[sphere]
        s = ct.spheres[ids]
        normal[sphere] = (ps - s[:, :3]) / s[:, 3:]
        albedo[sphere] = sphere_albedo(ct, ps, ids)
    return p, normal, albedo


def shade(
    caster: RayCaster, p: torch.Tensor, normal: torch.Tensor, albedo: torch.Tensor
) -> torch.Tensor:
    """Sun (with a hard shadow ray) plus sky ambient, brighter on upward-facing surfaces."""
    sun = caster.ct.sun
    cos = (normal @ sun).clamp(min=0)
    facing = cos > 0
    lit = torch.zeros_like(cos)
    origins = p[facing] + SHADOW_OFFSET * normal[facing]
    lit[facing] = (~caster.occluded(origins, sun)).float()
    light = AMBIENT * (0.8 + 0.2 * normal[:, 2]) + SUN * cos * lit
    return albedo * light[:, None]


def radiance(caster: RayCaster, o: torch.Tensor, d: torch.Tensor, hits: Hits) -> torch.Tensor:
    """Colour of rays [N, 3]: lit surfaces fading into haze with distance, sky for misses."""
    rgb = sky(d)
    hit = hits.kind != MISS
    if hit.any():
        h = hits[hit]
        p, normal, albedo = hit_surface(caster.ct, o[hit], d[hit], h)
        colour = shade(caster, p, normal, albedo)
        keep = torch.exp(-h.t / caster.geometry.haze)[:, None]
        horizon = torch.tensor(SKY_HORIZON, device=caster.device)
        rgb[hit] = torch.lerp(horizon.expand_as(colour), colour, keep)
    return rgb
