"""Vectorised torch ray caster for the procedural city: boxes, spheres and the ground plane.

Rays from a camera are culled against its frustum (:mod:`clm.synthetic.frustum_lists`), and
batched so that rays x candidates stays under a memory budget. Shadow rays and inside-tests
look up per-cell candidate lists of a 2D grid over the ground
(:mod:`clm.synthetic.cell_lists`). Colours are in :mod:`clm.synthetic.shading`, whole images
in :mod:`clm.synthetic.render_view`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clm.synthetic.cameras import Intrinsics
from clm.synthetic.cell_lists import build_cell_lists, swept_rects
from clm.synthetic.frustum_lists import frustum_lists
from clm.synthetic.geometry import CityGeometry
from clm.synthetic.intersect import (
    BOX,
    EPS,
    GROUND,
    MISS,
    SPHERE,
    Hits,
    box_hits,
    nearest_hit,
    safe_inverse,
    sphere_hits,
)
from clm.synthetic.materials import CityTensors


class RayCaster:
    """The city on one device, with the culling structures every query shares."""

    def __init__(
        self, geometry: CityGeometry, device: torch.device | str, pair_budget: int | None = None
    ):
        self.device = torch.device(device)
        self.geometry = geometry
        self.ct = CityTensors.create(geometry, self.device)
        # Rays x candidate primitives tested at once; bounds the temporaries (~100 B a pair).
        self.pair_budget = pair_budget or (2**24 if self.device.type == "cuda" else 2**19)
        self.far = 5.0 * geometry.haze  # beyond it haze leaves < 1 % of a surface's colour
        boxes, spheres, sun = geometry.boxes, geometry.spheres, geometry.sun
        box_rects = boxes[:, [0, 1, 3, 4]].astype(np.float64)
        sphere_rects = np.concatenate(
            [spheres[:, :2] - spheres[:, 3:], spheres[:, :2] + spheres[:, 3:]], axis=1
        ).astype(np.float64)
        cell = geometry.grid.period / 2
        self.footprints = build_cell_lists(box_rects, sphere_rects, cell, self.device)
        # Shadow candidates: a primitive shades every point its footprint reaches when swept
        # away from the sun down to the ground.
        run = -sun[:2].astype(np.float64) / max(float(sun[2]), 1e-3)
        box_shift = boxes[:, 5:6].astype(np.float64) * run
        sphere_shift = (spheres[:, 2:3] + spheres[:, 3:4]).astype(np.float64) * run
        self.shadows = build_cell_lists(
            swept_rects(box_rects, box_shift),
            swept_rects(sphere_rects, sphere_shift),
            cell,
            self.device,
        )

    def trace(
        self, o: torch.Tensor, d: torch.Tensor, box_ids: torch.Tensor, sphere_ids: torch.Tensor
    ) -> Hits:
        """Nearest hit of rays [G, R, 3] among per-group candidates [G, K] / [G, S] (-1 = none)."""
        tb, box = nearest_hit(box_hits, o, safe_inverse(d), self.ct.boxes, box_ids)
        ts, sphere = nearest_hit(sphere_hits, o, d, self.ct.spheres, sphere_ids)
        tg = -o[..., 2] / d[..., 2]
        tg = torch.where((d[..., 2] < -1e-9) & (tg > EPS), tg, math.inf)
        t = torch.minimum(torch.minimum(tb, ts), tg)
        kind = torch.where(
            t == tb, BOX, torch.where(t == ts, SPHERE, torch.where(t == tg, GROUND, MISS))
        )
        kind = torch.where(t <= self.far, kind, MISS)
        index = torch.where(kind == BOX, box, torch.where(kind == SPHERE, sphere, -1))
        return Hits(torch.where(kind == MISS, math.inf, t), kind, index)

    def trace_view(self, w2c: np.ndarray, intr: Intrinsics, dirs: torch.Tensor) -> Hits:
        """Rays from one camera's centre along world directions [N, 3] that lie in its image."""
        rects = torch.tensor([[0.0, 0.0, intr.width, intr.height]], device=self.device)
        box_ids, sphere_ids = frustum_lists(self.ct, self.far, w2c, intr, rects)
        centre = torch.as_tensor(
            -w2c[:3, :3].T @ w2c[:3, 3], dtype=torch.float32, device=self.device
        )
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        per = max(self.pair_budget // (box_ids.shape[1] + sphere_ids.shape[1] + 1), 1)
        parts = [
            self.trace(centre.expand_as(chunk)[None], chunk[None], box_ids, sphere_ids)[0]
            for chunk in dirs.split(per)
        ]
        if not parts:
            return Hits(
                dirs.new_zeros(0),
                dirs.new_zeros(0, dtype=torch.long),
                dirs.new_zeros(0, dtype=torch.long),
            )
        return Hits(
            torch.cat([h.t for h in parts]),
            torch.cat([h.kind for h in parts]),
            torch.cat([h.index for h in parts]),
        )

    def occluded(self, origins: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Whether rays [N, 3] along one upward ``direction`` meet a box or sphere (shadow test)."""
        out = torch.zeros(len(origins), dtype=torch.bool, device=self.device)
        k = self.shadows.boxes.shape[1] + self.shadows.spheres.shape[1] + 1
        per = max(self.pair_budget // k, 1)
        for start in range(0, len(origins), per):
            o = origins[start : start + per]
            box_ids, sphere_ids = self.shadows.lookup(o)
            d = direction.expand_as(o)
            tb, _ = box_hits(
                o[:, None],
                safe_inverse(d)[:, None],
                self.ct.boxes[box_ids.clamp(min=0)],
                box_ids >= 0,
            )
            ts, _ = sphere_hits(
                o[:, None], d[:, None], self.ct.spheres[sphere_ids.clamp(min=0)], sphere_ids >= 0
            )
            out[start : start + per] = torch.isfinite(torch.minimum(tb, ts))[:, 0]
        return out

    def inside(self, points: torch.Tensor) -> torch.Tensor:
        """Whether points [N, 3] lie inside any box or sphere, or under the ground."""
        out = points[:, 2] < 0
        k = self.footprints.boxes.shape[1] + self.footprints.spheres.shape[1] + 1
        per = max(self.pair_budget // k, 1)
        for start in range(0, len(points), per):
            p = points[start : start + per]
            box_ids, sphere_ids = self.footprints.lookup(p)
            b = self.ct.boxes[box_ids.clamp(min=0)]
            in_box = ((p[:, None] > b[..., :3]) & (p[:, None] < b[..., 3:])).all(-1) & (
                box_ids >= 0
            )
            s = self.ct.spheres[sphere_ids.clamp(min=0)]
            in_sph = ((p[:, None] - s[..., :3]).norm(dim=-1) < s[..., 3]) & (sphere_ids >= 0)
            out[start : start + per] |= in_box.any(-1) | in_sph.any(-1)
        return out
