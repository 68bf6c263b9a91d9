"""Camera sets over the procedural city: aerial (orbits and oblique flight lines) and street level.

Poses are world-to-camera matrices in the OpenCV convention (x right, y down, z forward),
the convention COLMAP stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clm.synthetic.geometry import CityGeometry

AERIAL, STREET = "aerial", "street"
WALK_FRAMES = 8  # street photos per walk along one street


@dataclass(frozen=True)
class Intrinsics:
    """One pinhole camera shared by every view; pixel centres sit at integer + 0.5."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_fov(cls, width: int, height: int, hfov_deg: float) -> Intrinsics:
        f = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
        return cls(width, height, f, f, width / 2, height / 2)


@dataclass(frozen=True, eq=False)
class View:
    """A posed image to render."""

    name: str
    kind: str  # AERIAL or STREET
    world_to_camera: np.ndarray  # [4, 4] float64

    @property
    def center(self) -> np.ndarray:
        rot = self.world_to_camera[:3, :3]
        return -rot.T @ self.world_to_camera[:3, 3]


def look_at(
    eye: np.ndarray, target: np.ndarray, up: tuple[float, float, float] = (0, 0, 1)
) -> np.ndarray:
    """World-to-camera matrix of a camera at ``eye`` looking at ``target`` with ``up`` upwards."""
    eye = np.asarray(eye, np.float64)
    forward = np.asarray(target, np.float64) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, np.float64))
    if np.linalg.norm(right) < 1e-6:  # looking straight along ``up``: any right vector will do
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, down, forward])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


def aerial_poses(geometry: CityGeometry, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Half on orbits, half on oblique flight lines (four headings), all above the tallest
    roof and pitched down at the city. A large city is photographed in parts: orbits circle
    hubs spread over it, a few blocks across, rather than the whole city at once."""
    x0, y0, x1, y1 = geometry.grid.bounds()
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    half = np.array([(x1 - x0) / 2, (y1 - y0) / 2])
    radius = float(np.linalg.norm(half))
    local = min(radius, 4 * geometry.grid.period)
    spread = half * (1 - local / radius)
    top = geometry.roof_range[1]
    poses = []
    for i in range(n):
        if i % 2 == 0:
            hub = centre + spread * rng.uniform(-1, 1, size=2)
            angle = 2 * math.pi * (i / 2) / max(n / 2, 1) + rng.uniform(-0.15, 0.15)
            eye_xy = hub + local * rng.uniform(0.7, 1.2) * np.array(
                [math.cos(angle), math.sin(angle)]
            )
            alt = top + local * rng.uniform(0.35, 0.8)
            target = np.array(
                [*(hub + local * rng.uniform(-0.3, 0.3, size=2)), rng.uniform(0, 0.3 * top)]
            )
        else:
            heading = (i // 2) % 4 * (math.pi / 2) + rng.uniform(-0.2, 0.2)
            pitch = math.radians(rng.uniform(40, 60))
            alt = top + local * rng.uniform(0.3, 0.55)
            look = np.array([math.cos(heading), math.sin(heading)])
            # Oblique rig flying over the city: it looks at a point of the block grid.
            target = np.array([*(centre + half * rng.uniform(-0.6, 0.6, size=2)), 0.0])
            eye_xy = target[:2] - look * alt / math.tan(pitch)
        poses.append(look_at(np.array([*eye_xy, alt]), target))
    return poses


def street_poses(geometry: CityGeometry, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Walks of WALK_FRAMES photos at eye height (1.5-2.3 m) along a lane of a random street,
    as a capture would take them: alternately looking along the street (5 m apart, walking
    from the city's first half into it) and across at the facades (3 m apart; boundary
    streets look inwards). Neighbouring frames overlap, so a held-out street view lies
    between training views."""
    g = geometry.grid
    poses: list[np.ndarray] = []
    while len(poses) < n:
        axis = int(rng.integers(2))  # 0: street runs along x, 1: along y
        lines, span = (g.blocks[1], g.blocks[0]) if axis == 0 else g.blocks
        k = int(rng.integers(lines + 1))
        street = np.array([1.0, 0.0]) if axis == 0 else np.array([0.0, 1.0])
        total = span * g.period
        sign = rng.choice([-1.0, 1.0])
        if len(poses) // WALK_FRAMES % 2:  # walks alternate: along, across, along, ...
            side = 1.0 if k == 0 else -1.0 if k == lines else rng.choice([-1.0, 1.0])
            heading, jitter, pitch, step, sign = side * street[::-1], 10.0, (3.0, 12.0), 3.0, 1.0
            start = rng.uniform(
                0.05 * total, max(0.95 * total - step * (WALK_FRAMES - 1), 0.1 * total)
            )
        else:  # walking in the looking direction, from the city's first half
            heading, jitter, pitch, step = sign * street, 6.0, (0.0, 6.0), 5.0
            start = total / 2 - sign * rng.uniform(0.05, 0.45) * total
        lateral = k * g.period + rng.uniform(-0.3, 0.3) * g.road
        height = rng.uniform(1.5, 2.3)
        for f in range(min(WALK_FRAMES, n - len(poses))):
            along = start + sign * f * step
            a = math.radians(rng.uniform(-jitter, jitter))
            c, s = math.cos(a), math.sin(a)
            d = np.array([c * heading[0] - s * heading[1], s * heading[0] + c * heading[1]])
            p = math.radians(rng.uniform(*pitch))
            xy = np.array([along, lateral]) if axis == 0 else np.array([lateral, along])
            eye = np.array([*(np.array(g.origin) + xy), height])
            poses.append(look_at(eye, eye + np.array([*(d * math.cos(p)), math.sin(p)])))
    return poses


def make_views(
    geometry: CityGeometry, n: int, aerial_fraction: float, ext: str, rng: np.random.Generator
) -> list[View]:
    """Aerial and street views interleaved, so that any every-k-th split holds both kinds."""

    def aerial_so_far(i: int) -> int:  # rounded share: the first view is aerial
        return math.floor(i * aerial_fraction + 0.5 + 1e-9)

    kinds = [AERIAL if aerial_so_far(i + 1) > aerial_so_far(i) else STREET for i in range(n)]
    aerial = iter(aerial_poses(geometry, kinds.count(AERIAL), rng))
    street = iter(street_poses(geometry, kinds.count(STREET), rng))
    return [
        View(f"{i:05d}_{k}.{ext}", k, next(aerial) if k == AERIAL else next(street))
        for i, k in enumerate(kinds)
    ]
