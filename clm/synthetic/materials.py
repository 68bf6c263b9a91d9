"""The colour of every surface of the procedural city, and of the sky.

The colour functions are torch, so one piece of code colours ray-cast pixels and densely
sampled surface points alike, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clm.synthetic.geometry import (
    ASPHALT,
    FIELD,
    FLOOR_HEIGHT,
    GLASS,
    GRASS,
    MARKING,
    PLAZA,
    ROOF,
    SIDEWALK,
    SKY_HORIZON,
    SKY_ZENITH,
    TRUNK,
    WALL,
    WINDOW_HEIGHT,
    WINDOW_SPACING,
    WINDOW_WIDTH,
    ZEBRA,
    CityGeometry,
)


@dataclass
class CityTensors:
    """The geometry on a torch device, with per-box style rows gathered once."""

    geometry: CityGeometry
    boxes: torch.Tensor  # [B, 6]
    box_kind: torch.Tensor  # [B]
    box_styles: torch.Tensor  # [B, STYLE_COLUMNS]
    spheres: torch.Tensor  # [T, 4]
    sphere_rgb: torch.Tensor  # [T, 3]
    sun: torch.Tensor  # [3]

    @classmethod
    def create(cls, geometry: CityGeometry, device: torch.device | str) -> CityTensors:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, device=device)

        return cls(
            geometry=geometry,
            boxes=t(geometry.boxes),
            box_kind=t(geometry.box_kind),
            box_styles=t(geometry.styles)[t(geometry.box_style)],
            spheres=t(geometry.spheres),
            sphere_rgb=t(geometry.sphere_rgb),
            sun=t(geometry.sun),
        )


def _hash(ix: torch.Tensor, iy: torch.Tensor, salt: int) -> torch.Tensor:
    """Integer lattice hash to [0, 1); 31-bit arithmetic so CPU and CUDA agree bit for bit."""
    m = 0x7FFFFFFF
    h = (ix * 0x27D4EB2D + iy * 0x165667B1 + salt * 0x9E3779B1) & m
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & m
    h = ((h ^ (h >> 12)) * 0x297A2D39) & m
    h = h ^ (h >> 15)
    return h.to(torch.float32) * (1.0 / 2**31)


def value_noise(x: torch.Tensor, y: torch.Tensor, scale: float, salt: int) -> torch.Tensor:
    """Smooth 2D value noise in [0, 1) with features about ``scale`` metres across."""
    u, v = x / scale, y / scale
    fu, fv = torch.floor(u), torch.floor(v)
    su, sv = u - fu, v - fv
    su, sv = su * su * (3 - 2 * su), sv * sv * (3 - 2 * sv)
    i, j = fu.long(), fv.long()
    a, b = _hash(i, j, salt), _hash(i + 1, j, salt)
    c, d = _hash(i, j + 1, salt), _hash(i + 1, j + 1, salt)
    return torch.lerp(torch.lerp(a, b, su), torch.lerp(c, d, su), sv)


def _rgb(colour: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32, device=like.device)


def _pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None], a, b)


def ground_albedo(ct: CityTensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Roads with dashed centre lines and zebra crossings, tiled sidewalks, lawns, fields."""
    g, salt = ct.geometry.grid, ct.geometry.noise_seed
    (ox, oy), (nx, ny), period = g.origin, g.blocks, g.period
    half, walk = g.road / 2, g.road / 2 + g.sidewalk
    kx = torch.round((x - ox) / period).clamp(0, nx)
    ky = torch.round((y - oy) / period).clamp(0, ny)
    dx, dy = x - (ox + kx * period), y - (oy + ky * period)
    ax, ay = dx.abs(), dy.abs()
    in_x = (x > ox - walk) & (x < ox + nx * period + walk)
    in_y = (y > oy - walk) & (y < oy + ny * period + walk)
    road_x, road_y = (ax < half) & in_y, (ay < half) & in_x  # roads running along y / along x
    road = road_x | road_y
    sidewalk = ~road & (((ax < walk) & in_y) | ((ay < walk) & in_x))

    coarse = value_noise(x, y, 3.0, salt)
    fine = value_noise(x, y, 0.8, salt + 1)

    colour = torch.empty(len(x), 3, device=x.device)
    city = in_x & in_y
    fx, fy = x[~city], y[~city]
    colour[~city] = _rgb(FIELD, x) * (0.75 + 0.4 * value_noise(fx, fy, 25.0, salt + 2))[:, None]
    block = _hash(
        torch.floor((x - ox) / period).long(), torch.floor((y - oy) / period).long(), salt
    )
    lot = torch.where(
        (block < 0.3)[:, None],
        _rgb(PLAZA, x) * (0.9 + 0.1 * fine)[:, None],
        _rgb(GRASS, x) * (0.75 + 0.35 * coarse)[:, None],
    )
    colour = _pick(city, lot, colour)

    tile = 1.5 * ct.geometry.texture_scale
    seam = (torch.frac(x / tile) < 0.07) | (torch.frac(y / tile) < 0.07)
    paving = _rgb(SIDEWALK, x) * (0.92 + 0.1 * fine - 0.12 * seam)[:, None]
    colour = _pick(sidewalk, paving, colour)

    asphalt = _rgb(ASPHALT, x) * (0.85 + 0.2 * coarse + 0.1 * fine)[:, None]
    colour = _pick(road, asphalt, colour)
    # Dashed centre lines away from the crossings; zebra stripes where a sidewalk crosses a road.
    dash_x = road_x & ~road_y & (ax < 0.15) & (ay > walk) & (torch.frac(y / 6.0) < 0.5)
    dash_y = road_y & ~road_x & (ay < 0.15) & (ax > walk) & (torch.frac(x / 6.0) < 0.5)
    colour = _pick(dash_x | dash_y, _rgb(MARKING, x).expand_as(colour), colour)
    zebra_x = (
        road_x & ~road_y & (ay > half + 0.4) & (ay < walk - 0.4) & (torch.frac(dx / 1.2) < 0.5)
    )
    zebra_y = (
        road_y & ~road_x & (ax > half + 0.4) & (ax < walk - 0.4) & (torch.frac(dy / 1.2) < 0.5)
    )
    return _pick(zebra_x | zebra_y, _rgb(ZEBRA, x).expand_as(colour), colour)


def box_albedo(
    ct: CityTensors, p: torch.Tensor, axis: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    """Colour of points ``p`` on faces (normal along ``axis``: 0, 1 walls, 2 roof) of boxes ``box``.

    Each kind of face is coloured on its own subset, so no point pays for the others' patterns.
    """
    out = torch.empty_like(p)
    trunk = ct.box_kind[box] == TRUNK
    roof = (axis == 2) & ~trunk
    wall = ~(trunk | roof)
    for mask, paint in ((wall, _facade), (roof, _roof), (trunk, _bark)):
        if mask.any():
            out[mask] = paint(ct, p[mask], axis[mask], box[mask])
    return out


def _facade(
    ct: CityTensors, p: torch.Tensor, axis: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    """Walls with floor slabs, a window grid centred on each wall, shop fronts at street level."""
    salt = ct.geometry.noise_seed + 7
    b, st = ct.boxes[box], ct.box_styles[box]
    x, y, z = p.unbind(-1)
    floor_h, spacing = st[:, FLOOR_HEIGHT], st[:, WINDOW_SPACING]
    on_x = axis == 0
    u = torch.where(on_x, y - b[:, 1], x - b[:, 0])
    length = torch.where(on_x, b[:, 4] - b[:, 1], b[:, 3] - b[:, 0])
    cols = torch.floor(length / spacing).clamp(min=1)
    cu = (u - (length - cols * spacing) / 2) / spacing
    col = torch.floor(cu)
    fu = (cu - col - 0.5).abs()
    in_col = (col >= 0) & (col < cols)
    ground_floor = 1.25 * floor_h
    cz = (z - ground_floor) / floor_h
    row = torch.floor(cz)
    fz = cz - row
    upper = (z > ground_floor) & (z < b[:, 5] - 0.9)
    window = (
        upper
        & in_col
        & (fu < st[:, WINDOW_WIDTH] / 2)
        & ((fz - 0.55).abs() < st[:, WINDOW_HEIGHT] / 2)
    )
    shop = (b[:, 2] < 0.01) & in_col & (z > 0.5) & (z < ground_floor - 0.9) & (fu < 0.33)
    face_id = box * 4 + axis * 2 + (u > length / 2).long()
    vary = 0.7 + 0.6 * _hash(col.long() * 131 + face_id, row.long(), salt)
    glass = st[:, GLASS] * torch.where(shop, 1.4, vary)[:, None]
    facade = st[:, WALL] * (0.88 + 0.16 * value_noise(x + y, z, 2.0, salt))[:, None]
    facade = facade * torch.where(upper & (fz < 0.08), 0.82, 1.0)[:, None]
    return _pick(window | shop, glass, facade)


def _roof(ct: CityTensors, p: torch.Tensor, axis: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Gravel-like roof inside a parapet rim in the wall colour."""
    b, st = ct.boxes[box], ct.box_styles[box]
    x, y, _ = p.unbind(-1)
    rim = torch.minimum(
        torch.minimum(x - b[:, 0], b[:, 3] - x), torch.minimum(y - b[:, 1], b[:, 4] - y)
    )
    top = st[:, ROOF] * (0.85 + 0.25 * value_noise(x, y, 2.5, ct.geometry.noise_seed + 8))[:, None]
    return _pick(rim < 0.5, st[:, WALL] * 0.9, top)


def _bark(ct: CityTensors, p: torch.Tensor, axis: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    x, y, z = p.unbind(-1)
    return ct.box_styles[box][:, WALL] * (0.85 + 0.3 * value_noise(x + y, z, 0.5, 9))[:, None]


def sphere_albedo(ct: CityTensors, p: torch.Tensor, sphere: torch.Tensor) -> torch.Tensor:
    """Leafy canopies: each tree's green, mottled."""
    x, y, z = p.unbind(-1)
    n = value_noise(x + 0.6 * z, y - 0.4 * z, 0.9, ct.geometry.noise_seed + 11)
    return ct.sphere_rgb[sphere] * (0.7 + 0.5 * n)[:, None]


def sky(directions: torch.Tensor) -> torch.Tensor:
    """Horizon-to-zenith gradient; below the horizon it stays the horizon (haze) colour."""
    e = directions[:, 2].clamp(0, 1) ** 0.6
    return torch.lerp(_rgb(SKY_HORIZON, directions), _rgb(SKY_ZENITH, directions), e[:, None])
