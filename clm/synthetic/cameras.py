"""Camera sets over the procedural city: aerial (orbits and oblique flight lines) and street level.

Poses are world-to-camera matrices in the OpenCV convention (x right, y down, z forward),
the convention COLMAP stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clm.synthetic.geometry import CityGeometry

AERIAL, STREET = "aerial", "street"
WALK_FRAMES = 8  # street photos per walk along one street
ORBIT_FRAMES = 24  # aerial photos per orbit


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
    """Orbits and oblique flight lines, interleaved, all above the tallest roof and pitched
    down at the city. Both come in sequences of overlapping frames, as a survey flies them."""
    area = _Area.of(geometry)
    orbits = _orbits(area, n - n // 2, rng)
    lines = _flight_lines(area, n // 2, rng)
    return [orbits[i // 2] if i % 2 == 0 else lines[i // 2] for i in range(n)]


@dataclass(frozen=True)
class _Area:
    """Where the aerial survey flies: a large city is photographed a few blocks at a time."""

    centre: np.ndarray
    half: np.ndarray  # half extent of the street grid
    local: float  # radius of the part of the city one orbit covers
    spread: np.ndarray  # how far from the centre orbit hubs may lie
    top: float  # tallest roof

    @classmethod
    def of(cls, geometry: CityGeometry) -> _Area:
        x0, y0, x1, y1 = geometry.grid.bounds()
        half = np.array([(x1 - x0) / 2, (y1 - y0) / 2])
        radius = float(np.linalg.norm(half))
        local = min(radius, 4 * geometry.grid.period)
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        return cls(centre, half, local, half * (1 - local / radius), geometry.roof_range[1])


def _orbits(area: _Area, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Circles of up to ORBIT_FRAMES evenly spaced views around hubs spread over the city."""
    poses: list[np.ndarray] = []
    while len(poses) < n:
        frames = min(ORBIT_FRAMES, n - len(poses))
        hub = area.centre + area.spread * rng.uniform(-1, 1, size=2)
        dist = area.local * rng.uniform(0.8, 1.1)
        alt = area.top + area.local * rng.uniform(0.4, 0.7)
        phase = rng.uniform(0, 2 * math.pi)
        for j in range(frames):
            angle = phase + 2 * math.pi * j / frames
            eye = np.array([*(hub + dist * np.array([math.cos(angle), math.sin(angle)])), alt])
            target_xy = hub + area.local * rng.uniform(-0.15, 0.15, size=2)
            poses.append(look_at(eye, np.array([*target_xy, rng.uniform(0, 0.2 * area.top)])))
    return poses


def _flight_lines(area: _Area, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Serpentine passes over a grid of aim points, one pass per oblique heading (N, E, S, W),
    as an oblique camera rig flies a survey."""
    per_pass = -(-n // 4)
    side = max(math.ceil(math.sqrt(per_pass)), 1)
    steps = np.linspace(-0.6, 0.6, side) if side > 1 else np.zeros(1)
    aims = [(x, y) for r, y in enumerate(steps) for x in (steps if r % 2 == 0 else steps[::-1])]
    poses: list[np.ndarray] = []
    for heading in np.arange(4) * (math.pi / 2):
        look = np.array([math.cos(heading), math.sin(heading)])
        pitch = math.radians(rng.uniform(42, 55))
        alt = area.top + area.local * rng.uniform(0.35, 0.5)
        for aim in aims[: min(per_pass, n - len(poses))]:
            target = area.centre + area.half * (np.array(aim) + rng.uniform(-0.02, 0.02, size=2))
            eye = np.array([*(target - look * alt / math.tan(pitch)), alt])
            poses.append(look_at(eye, np.array([*target, 0.0])))
    return poses


def survey_poses(
    geometry: CityGeometry, n: int, altitudes: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """An oblique survey of the whole street grid at each of ``altitudes`` (metres above the
    ground), as a metropolitan aerial capture flies it (MatrixCity's aerial views, say).

    Per altitude, four serpentine passes over one grid of aim points spanning the city, one per
    heading (the four oblique cameras of a rig, at a random angle to the streets). Cameras are
    pitched 48-58 degrees down, so the horizon stays out of view and a view covers a few blocks
    whatever the city's size; every block is seen from four sides at every altitude.
    """
    x0, y0, x1, y1 = geometry.grid.bounds()
    lo, size = np.array([x0, y0]), np.array([x1 - x0, y1 - y0])
    poses: list[np.ndarray] = []
    for level, alt in enumerate(altitudes):
        level_views = n // len(altitudes) + (level < n % len(altitudes))
        yaw0 = rng.uniform(0, math.pi / 2)
        for heading in range(4):
            views = level_views // 4 + (heading < level_views % 4)
            for aim, cell in _aim_grid(views):
                yaw = yaw0 + heading * math.pi / 2 + math.radians(rng.uniform(-4, 4))
                pitch = math.radians(rng.uniform(48, 58))
                target = lo + size * (aim + cell * rng.uniform(-0.3, 0.3, size=2))
                look = np.array([math.cos(yaw), math.sin(yaw)])
                eye = np.array([*(target - look * alt / math.tan(pitch)), alt])
                poses.append(look_at(eye, np.array([*target, 0.0])))
    return poses


def _aim_grid(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` aim points covering the unit square in serpentine rows (the rows hold n between
    them, so no strip is left out), each with the size of its cell."""
    rows = max(round(math.sqrt(n)), 1)
    out = []
    for r, count in enumerate(len(part) for part in np.array_split(np.arange(n), rows)):
        order = range(count) if r % 2 == 0 else reversed(range(count))
        cell = np.array([1 / max(count, 1), 1 / rows])
        out += [(np.array([(i + 0.5) * cell[0], (r + 0.5) * cell[1]]), cell) for i in order]
    return out


def street_poses(geometry: CityGeometry, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Walks of WALK_FRAMES photos at eye height (1.5-2.3 m) along a lane of a random street,
    as a capture would take them: alternately looking along the street (5 m apart, walking
    into the city) and across at the facades (3 m apart; boundary streets look inwards).
    Neighbouring frames overlap, so a held-out street view lies between training views."""
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
        else:  # walking the way it looks, with at least `ahead` metres of street still in view
            heading, jitter, pitch, step = sign * street, 6.0, (0.0, 6.0), 5.0
            ahead = min(0.6 * total, 150.0)
            last = max(total - step * (WALK_FRAMES - 1) - ahead, 0.02 * total)
            offset = rng.uniform(0.02 * total, last)
            start = offset if sign > 0 else total - offset
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


def facade_poses(geometry: CityGeometry, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Walks of WALK_FRAMES photos 3 m apart along a sidewalk at eye height (1.5-2.3 m), each
    looking across the street at the facades opposite (boundary streets look inwards), turned
    up to 30 degrees along the street and pitched 20-30 degrees up.

    With a vertical field of view up to 40 degrees the horizon stays below the image, so a
    view's frustum holds the facades in front and the tops of tall buildings beyond, not the
    whole city down the street that a level street photo takes in.
    """
    g = geometry.grid
    poses: list[np.ndarray] = []
    while len(poses) < n:
        axis = int(rng.integers(2))  # 0: street runs along x, 1: along y
        lines, span = (g.blocks[1], g.blocks[0]) if axis == 0 else g.blocks
        k = int(rng.integers(lines + 1))
        side = 1.0 if k == 0 else -1.0 if k == lines else rng.choice([-1.0, 1.0])
        heading = side * (np.array([0.0, 1.0]) if axis == 0 else np.array([1.0, 0.0]))
        lateral = k * g.period - side * (g.road / 2 + g.sidewalk * rng.uniform(0.3, 0.7))
        total = span * g.period
        start = rng.uniform(0.02 * total, max(0.98 * total - 3.0 * (WALK_FRAMES - 1), 0.03 * total))
        height = rng.uniform(1.5, 2.3)
        for f in range(min(WALK_FRAMES, n - len(poses))):
            a = math.radians(rng.uniform(-30, 30))
            c, s = math.cos(a), math.sin(a)
            d = np.array([c * heading[0] - s * heading[1], s * heading[0] + c * heading[1]])
            p = math.radians(rng.uniform(20, 30))
            along = start + 3.0 * f
            xy = np.array([along, lateral]) if axis == 0 else np.array([lateral, along])
            eye = np.array([*(np.array(g.origin) + xy), height])
            poses.append(look_at(eye, eye + np.array([*(d * math.cos(p)), math.sin(p)])))
    return poses


def make_views(
    geometry: CityGeometry,
    n: int,
    aerial_fraction: float,
    ext: str,
    rng: np.random.Generator,
    survey: Sequence[float] = (),
) -> list[View]:
    """Aerial and street views interleaved, so that any every-k-th split holds both kinds.

    The aerial views are orbits and flight lines over a few blocks at a time and the street
    views walks along and across streets; or, when ``survey`` lists altitudes, an oblique
    survey of the whole city at those altitudes and street views of the facades.
    """

    def aerial_so_far(i: int) -> int:  # rounded share: the first view is aerial
        return math.floor(i * aerial_fraction + 0.5 + 1e-9)

    kinds = [AERIAL if aerial_so_far(i + 1) > aerial_so_far(i) else STREET for i in range(n)]
    aerial_count = kinds.count(AERIAL)
    if survey:
        aerial = iter(survey_poses(geometry, aerial_count, survey, rng))
        street = iter(facade_poses(geometry, kinds.count(STREET), rng))
    else:
        aerial = iter(aerial_poses(geometry, aerial_count, rng))
        street = iter(street_poses(geometry, kinds.count(STREET), rng))
    return [
        View(f"{i:05d}_{k}.{ext}", k, next(aerial) if k == AERIAL else next(street))
        for i, k in enumerate(kinds)
    ]


def in_frustum(view: View, intr: Intrinsics, points: np.ndarray) -> np.ndarray:
    """Which of ``points`` [N, 3] project into the view's image, in front of it (occluded or
    not): what frustum culling hands the view's render."""
    cam = points @ view.world_to_camera[:3, :3].T + view.world_to_camera[:3, 3]
    z = np.maximum(cam[:, 2], 1e-9)
    u, v = intr.fx * cam[:, 0] / z + intr.cx, intr.fy * cam[:, 1] / z + intr.cy
    return (cam[:, 2] > 0) & (u >= 0) & (u < intr.width) & (v >= 0) & (v < intr.height)


def frustum_fractions(views: Sequence[View], intr: Intrinsics, points: np.ndarray) -> np.ndarray:
    """Per view, the share of surface samples ``points`` [N, 3] in its frustum: the share of a
    dense model that a view's render touches."""
    if len(points) == 0:
        return np.zeros(len(views))
    return np.array([in_frustum(view, intr, points).mean() for view in views])
