"""Procedural city: street grid, building boxes and trees, with each building's style.

The geometry is plain arrays, so it serialises to ``synthetic.json`` and can be rebuilt
exactly later; the colour of every surface is in :mod:`clm.synthetic.materials`. World units
are metres, z up, ground at z = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clm.errors import ClmError

# Columns of the per-building style table.
WALL, GLASS, ROOF = slice(0, 3), slice(3, 6), slice(6, 9)
FLOOR_HEIGHT, WINDOW_SPACING, WINDOW_WIDTH, WINDOW_HEIGHT = 9, 10, 11, 12
STYLE_COLUMNS = 13

BUILDING, TRUNK = 0, 1  # box kinds

# Facade families: (wall, glass, roof, window width fraction, window height fraction).
_FAMILIES = {
    "brick": ((0.56, 0.31, 0.23), (0.20, 0.23, 0.28), (0.32, 0.30, 0.29), 0.45, 0.55),
    "beige": ((0.80, 0.72, 0.57), (0.22, 0.26, 0.32), (0.45, 0.42, 0.40), 0.45, 0.50),
    "white": ((0.86, 0.86, 0.83), (0.20, 0.25, 0.33), (0.55, 0.55, 0.55), 0.50, 0.55),
    "sandstone": ((0.74, 0.61, 0.44), (0.18, 0.22, 0.27), (0.40, 0.36, 0.33), 0.40, 0.55),
    "concrete": ((0.62, 0.62, 0.60), (0.17, 0.22, 0.28), (0.36, 0.36, 0.37), 0.60, 0.55),
    "glass": ((0.36, 0.42, 0.48), (0.22, 0.36, 0.48), (0.30, 0.31, 0.33), 0.86, 0.78),
}
_LOW_FAMILIES = ("brick", "beige", "white", "sandstone")
_TALL_FAMILIES = ("concrete", "glass", "sandstone", "white")

ASPHALT = (0.24, 0.24, 0.25)
SIDEWALK = (0.63, 0.62, 0.59)
GRASS = (0.30, 0.44, 0.20)
PLAZA = (0.66, 0.60, 0.52)
FIELD = (0.46, 0.49, 0.30)
MARKING = (0.88, 0.80, 0.45)
ZEBRA = (0.88, 0.88, 0.86)
TRUNK_RGB = (0.36, 0.26, 0.17)
SKY_ZENITH = (0.33, 0.53, 0.84)
SKY_HORIZON = (0.78, 0.85, 0.93)


@dataclass(frozen=True)
class CityParams:
    """Knobs of the procedural layout; every preset is one of these plus a seed."""

    blocks: tuple[int, int] = (2, 2)
    block: float = 40.0  # distance between the road edges around a block (sidewalks included)
    road: float = 10.0
    sidewalk: float = 3.0
    max_lots: int = 2  # a block is split into up to max_lots x max_lots lots
    min_height: float = 6.0
    max_height: float = 40.0
    downtown_height: float = 20.0  # typical height at the centre, falling off outwards
    park_fraction: float = 0.1
    street_trees: float = 0.5  # probability that a tree slot along a sidewalk holds a tree
    texture_scale: float = 1.0  # >1 makes windows and floors larger (coarser facades)


@dataclass(frozen=True)
class StreetGrid:
    """Road centrelines at ``origin + k * period`` for ``k = 0..blocks`` in x and in y."""

    origin: tuple[float, float]
    blocks: tuple[int, int]
    block: float
    road: float
    sidewalk: float

    @property
    def period(self) -> float:
        return self.block + self.road

    def bounds(self) -> tuple[float, float, float, float]:
        """Outer edge of the boundary roads' sidewalks: (xmin, ymin, xmax, ymax)."""
        m = self.road / 2 + self.sidewalk
        (ox, oy), (nx, ny) = self.origin, self.blocks
        return (ox - m, oy - m, ox + nx * self.period + m, oy + ny * self.period + m)


@dataclass
class CityGeometry:
    """Everything the ray caster and the surface sampler need, as plain arrays."""

    grid: StreetGrid
    ground: tuple[float, float, float, float]  # region of ground that is sampled densely
    boxes: np.ndarray  # [B, 6] float32: xmin, ymin, zmin, xmax, ymax, zmax
    box_kind: np.ndarray  # [B] int64: BUILDING or TRUNK
    box_style: np.ndarray  # [B] int64: row of ``styles`` (one row per building)
    styles: np.ndarray  # [S, STYLE_COLUMNS] float32
    spheres: np.ndarray  # [T, 4] float32: tree canopies, centre and radius
    sphere_rgb: np.ndarray  # [T, 3] float32
    sun: np.ndarray  # [3] float32, unit vector towards the sun
    haze: float  # distance over which the air fades a surface to the horizon colour by 1/e
    noise_seed: int
    texture_scale: float

    @property
    def roof_range(self) -> tuple[float, float]:
        """Lowest and highest building top: street cameras stay below one, aerial above both."""
        tops = self.boxes[self.box_kind == BUILDING, 5]
        return float(tops.min()), float(tops.max())

    def to_json(self) -> dict:
        g = self.grid
        return {
            "grid": {
                "origin": list(g.origin),
                "blocks": list(g.blocks),
                "block": g.block,
                "road": g.road,
                "sidewalk": g.sidewalk,
            },
            "ground": list(self.ground),
            "boxes": self.boxes.tolist(),
            "box_kind": self.box_kind.tolist(),
            "box_style": self.box_style.tolist(),
            "styles": self.styles.tolist(),
            "spheres": self.spheres.tolist(),
            "sphere_rgb": self.sphere_rgb.tolist(),
            "sun": self.sun.tolist(),
            "haze": self.haze,
            "noise_seed": self.noise_seed,
            "texture_scale": self.texture_scale,
        }

    @classmethod
    def from_json(cls, d: dict) -> CityGeometry:
        g = d["grid"]
        f32 = np.float32
        return cls(
            grid=StreetGrid(
                origin=tuple(g["origin"]),
                blocks=tuple(g["blocks"]),
                block=g["block"],
                road=g["road"],
                sidewalk=g["sidewalk"],
            ),
            ground=tuple(d["ground"]),
            boxes=np.asarray(d["boxes"], f32).reshape(-1, 6),
            box_kind=np.asarray(d["box_kind"], np.int64),
            box_style=np.asarray(d["box_style"], np.int64),
            styles=np.asarray(d["styles"], f32).reshape(-1, STYLE_COLUMNS),
            spheres=np.asarray(d["spheres"], f32).reshape(-1, 4),
            sphere_rgb=np.asarray(d["sphere_rgb"], f32).reshape(-1, 3),
            sun=np.asarray(d["sun"], f32),
            haze=float(d["haze"]),
            noise_seed=int(d["noise_seed"]),
            texture_scale=float(d["texture_scale"]),
        )


def load_geometry(scene_dir: Path | str) -> CityGeometry:
    """Rebuild the geometry of a generated scene from its ``synthetic.json``."""
    import json

    path = Path(scene_dir) / "synthetic.json"
    try:
        data = json.loads(path.read_text())
        return CityGeometry.from_json(data["geometry"])
    except FileNotFoundError:
        raise ClmError(f"{path} not found: not a scene written by clm-synth") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClmError(f"{path} is unreadable or malformed: {exc}") from None


# ----------------------------------------------------------------------------- layout


def build_city(params: CityParams, seed: int) -> CityGeometry:
    """Lay out blocks, buildings (some with a tower tier) and trees, deterministically."""
    rng = np.random.default_rng([seed, 0x5C17])
    grid = StreetGrid(
        origin=(0.0, 0.0),
        blocks=params.blocks,
        block=params.block,
        road=params.road,
        sidewalk=params.sidewalk,
    )
    city = _CityBuilder(rng, params)
    nx, ny = params.blocks
    centre = np.array([nx, ny]) * grid.period / 2
    radius = max(float(np.linalg.norm(centre)), 1.0)
    size = params.block - 2 * params.sidewalk  # the lots' side
    for bx in range(nx):
        for by in range(ny):
            corner = np.array([bx, by]) * grid.period + params.road / 2 + params.sidewalk
            downtown = math.exp(
                -((np.linalg.norm(corner + size / 2 - centre) / (0.6 * radius)) ** 2)
            )
            if nx * ny > 2 and rng.random() < params.park_fraction:
                _park(rng, corner, size, city.spheres)
            else:
                city.block(corner, size, downtown)
    _street_trees(rng, grid, params.street_trees, city.spheres)
    city.trunks()

    spheres = np.asarray(city.spheres, np.float32).reshape(-1, 4)
    greens = np.array([0.22, 0.38, 0.15]) * rng.uniform(0.75, 1.25, size=(len(spheres), 3))
    x0, y0, x1, y1 = grid.bounds()
    margin = max(0.25 * max(x1 - x0, y1 - y0), 40.0)
    azimuth = rng.uniform(0, 2 * math.pi)
    elevation = math.radians(rng.uniform(42, 58))
    sun = [math.cos(azimuth), math.sin(azimuth), math.tan(elevation)]
    return CityGeometry(
        grid=grid,
        ground=(x0 - margin, y0 - margin, x1 + margin, y1 + margin),
        boxes=np.asarray(city.boxes, np.float32).reshape(-1, 6),
        box_kind=np.asarray(city.kinds, np.int64),
        box_style=np.asarray(city.box_style, np.int64),
        styles=np.stack(city.styles).astype(np.float32),
        spheres=spheres,
        sphere_rgb=np.clip(greens, 0, 1).astype(np.float32),
        sun=(np.array(sun) / np.linalg.norm(sun)).astype(np.float32),
        haze=float(6.0 * max(x1 - x0, y1 - y0, 100.0)),
        noise_seed=int(rng.integers(0, 2**20)),
        texture_scale=params.texture_scale,
    )


class _CityBuilder:
    """Accumulates boxes (with their kind and style row) and tree spheres while laying out."""

    def __init__(self, rng: np.random.Generator, params: CityParams):
        self.rng, self.params = rng, params
        self.boxes: list[list[float]] = []
        self.kinds: list[int] = []
        self.box_style: list[int] = []
        self.styles: list[np.ndarray] = [_trunk_style()]
        self.spheres: list[list[float]] = []

    def block(self, corner: np.ndarray, size: float, downtown: float) -> None:
        """Split a block into lots; most get a building, taller towards downtown."""
        rng, p = self.rng, self.params
        lots = rng.integers(1, p.max_lots + 1, size=2)
        lot = size / lots
        typical = p.min_height + (p.downtown_height - p.min_height) * (0.35 + 0.65 * downtown)
        for i in range(lots[0]):
            for j in range(lots[1]):
                if lots.prod() > 1 and rng.random() < 0.12:
                    continue  # an open lot: the ground texture shows through
                lo = corner + np.array([i, j]) * lot + rng.uniform(0.6, 2.5, size=2)
                hi = corner + np.array([i + 1, j + 1]) * lot - rng.uniform(0.6, 2.5, size=2)
                if (hi - lo).min() < 5:
                    continue
                h = float(
                    np.clip(rng.lognormal(math.log(typical), 0.35), p.min_height, p.max_height)
                )
                self.building(lo, hi, h)

    def building(self, lo: np.ndarray, hi: np.ndarray, height: float) -> None:
        """A box from the ground, and on tall ones often a narrower tower on top."""
        rng, p = self.rng, self.params
        style = len(self.styles)
        self.styles.append(_building_style(rng, height, p.texture_scale))
        self._box([*lo, 0.0, *hi, height], BUILDING, style)
        if height > 2.2 * p.min_height and rng.random() < 0.5:
            inset = rng.uniform(0.15, 0.3, size=4) * np.tile(hi - lo, 2)
            top = min(height * (1 + rng.uniform(0.25, 0.7)), p.max_height * 1.3)
            self._box([*(lo + inset[:2]), height, *(hi - inset[2:]), top], BUILDING, style)

    def trunks(self) -> None:
        """A thin trunk under every canopy."""
        for cx, cy, cz, r in self.spheres:
            self._box([cx - 0.18, cy - 0.18, 0.0, cx + 0.18, cy + 0.18, cz - 0.4 * r], TRUNK, 0)

    def _box(self, bounds: list[float], kind: int, style: int) -> None:
        self.boxes.append(bounds)
        self.kinds.append(kind)
        self.box_style.append(style)


def _trunk_style() -> np.ndarray:
    row = np.zeros(STYLE_COLUMNS, np.float32)
    row[WALL] = row[GLASS] = row[ROOF] = TRUNK_RGB
    row[[FLOOR_HEIGHT, WINDOW_SPACING]] = 1.0
    return row


def _building_style(rng: np.random.Generator, height: float, texture_scale: float) -> np.ndarray:
    families = _TALL_FAMILIES if height > 24 else _LOW_FAMILIES
    wall, glass, roof, ww, wh = _FAMILIES[families[rng.integers(len(families))]]
    row = np.zeros(STYLE_COLUMNS, np.float32)
    row[WALL] = np.clip(np.array(wall) * rng.uniform(0.88, 1.12, 3), 0, 1)
    row[GLASS] = np.clip(np.array(glass) * rng.uniform(0.85, 1.15, 3), 0, 1)
    row[ROOF] = np.clip(np.array(roof) * rng.uniform(0.85, 1.15), 0, 1)
    row[FLOOR_HEIGHT] = rng.uniform(3.0, 3.8) * texture_scale
    row[WINDOW_SPACING] = rng.uniform(2.4, 3.6) * texture_scale * (0.7 if ww > 0.8 else 1.0)
    row[WINDOW_WIDTH] = ww * rng.uniform(0.9, 1.1)
    row[WINDOW_HEIGHT] = wh * rng.uniform(0.9, 1.1)
    return row


def _park(rng: np.random.Generator, corner: np.ndarray, size: float, out: list) -> None:
    for _ in range(int(rng.integers(3, 8))):
        r = rng.uniform(2.0, 3.5)
        cx, cy = corner + rng.uniform(r, size - r, size=2)
        out.append([cx, cy, r + rng.uniform(2.0, 3.5), r])


def _street_trees(rng: np.random.Generator, grid: StreetGrid, prob: float, out: list) -> None:
    """Trees in the middle of the sidewalks, a slot every ~12 m, skipping the corners."""
    offset = grid.road / 2 + grid.sidewalk / 2
    nx, ny = grid.blocks
    clear = grid.road / 2 + grid.sidewalk + 2.0
    for axis, (n_lines, n_along) in enumerate(((ny + 1, nx), (nx + 1, ny))):
        for k in range(n_lines):
            for side in (-1.0, 1.0):
                line = k * grid.period + side * offset
                for b in range(n_along):
                    start, stop = b * grid.period + clear, (b + 1) * grid.period - clear
                    slots = max(int((stop - start) // 12.0), 1)
                    for s in np.linspace(start, stop, slots + 1):
                        if rng.random() >= prob:
                            continue
                        r = rng.uniform(1.6, 2.6)
                        z = r + rng.uniform(3.0, 4.0)
                        out.append([s, line, z, r] if axis == 0 else [line, s, z, r])
