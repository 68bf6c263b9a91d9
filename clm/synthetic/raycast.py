"""Vectorised torch ray caster for the procedural city: boxes, spheres and the ground plane.

Primary rays are grouped by screen tile and each tile is culled against its own frustum, so
a ray only meets the few boxes its tile can see; tiles are batched so that rays x candidates
stays under a memory budget. Anti-aliasing re-renders only the pixels on an edge. Shadow
rays (one per sunlit hit) and inside-tests look up per-cell candidate lists of a 2D grid over
the ground. Shading is Lambert from the sun plus a sky ambient term, with aerial haze, and a
sky gradient for misses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from clm.synthetic.cameras import Intrinsics
from clm.synthetic.geometry import SKY_HORIZON, CityGeometry
from clm.synthetic.materials import CityTensors, box_albedo, ground_albedo, sky, sphere_albedo

MISS, GROUND, BOX, SPHERE = 0, 1, 2, 3
EPS = 1e-4  # nearest accepted hit distance
SHADOW_OFFSET = 0.02  # metres a shadow ray starts off its surface, against self-hits
AMBIENT, SUN = 0.42, 0.78


@dataclass
class Hits:
    """Nearest hit per ray: distance (inf on a miss), what was hit, and which one."""

    t: torch.Tensor
    kind: torch.Tensor
    index: torch.Tensor

    def __getitem__(self, key: torch.Tensor) -> Hits:
        return Hits(self.t[key], self.kind[key], self.index[key])


@dataclass
class CellLists:
    """A 2D grid over the ground; each cell lists (padded with -1) the primitives touching it."""

    origin: tuple[float, float]
    cell: float
    shape: tuple[int, int]
    boxes: torch.Tensor  # [cells, K]
    spheres: torch.Tensor  # [cells, S]

    def lookup(self, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.floor((xy[:, 0] - self.origin[0]) / self.cell).long()
        iy = torch.floor((xy[:, 1] - self.origin[1]) / self.cell).long()
        nx, ny = self.shape
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        cell = (ix.clamp(0, nx - 1) * ny + iy.clamp(0, ny - 1))[:, None]
        boxes = torch.where(inside[:, None], self.boxes[cell[:, 0]], -1)
        spheres = torch.where(inside[:, None], self.spheres[cell[:, 0]], -1)
        return boxes, spheres


def build_cell_lists(
    box_rects: np.ndarray, sphere_rects: np.ndarray, cell: float, device: torch.device
) -> CellLists:
    """Bin xy rectangles [N, 4] (xmin, ymin, xmax, ymax) of boxes and spheres into cells."""
    rects = np.concatenate([box_rects, sphere_rects]).reshape(-1, 4)
    if len(rects) == 0:
        rects = np.zeros((1, 4))
    x0, y0 = rects[:, 0].min(), rects[:, 1].min()
    nx = max(math.ceil((rects[:, 2].max() - x0) / cell), 1)
    ny = max(math.ceil((rects[:, 3].max() - y0) / cell), 1)

    def table(r: np.ndarray) -> torch.Tensor:
        ix0 = np.clip(np.floor((r[:, 0] - x0) / cell), 0, nx - 1).astype(np.int64)
        iy0 = np.clip(np.floor((r[:, 1] - y0) / cell), 0, ny - 1).astype(np.int64)
        ix1 = np.clip(np.floor((r[:, 2] - x0) / cell), 0, nx - 1).astype(np.int64)
        iy1 = np.clip(np.floor((r[:, 3] - y0) / cell), 0, ny - 1).astype(np.int64)
        # Every (cell, primitive) pair of the rectangles' cell ranges, primitive by primitive.
        tall = iy1 - iy0 + 1
        counts = (ix1 - ix0 + 1) * tall
        q = np.repeat(np.arange(len(r)), counts)
        j = np.arange(len(q)) - np.repeat(np.cumsum(counts) - counts, counts)
        c = (ix0[q] + j // tall[q]) * ny + iy0[q] + j % tall[q]
        out = np.full((nx * ny, 1), -1, np.int64)
        if len(r):
            order = np.argsort(c, kind="stable")
            c, q = c[order], q[order]
            counts = np.bincount(c, minlength=nx * ny)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            out = np.full((nx * ny, max(int(counts.max()), 1)), -1, np.int64)
            out[c, np.arange(len(c)) - starts[c]] = q
        return torch.as_tensor(out, device=device)

    return CellLists((float(x0), float(y0)), cell, (nx, ny), table(box_rects), table(sphere_rects))


def _box_hits(
    o: torch.Tensor, inv: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab test. o, inv: [G, R, 3]; boxes: [G, K, 6]; valid: [G, K] -> nearest t, k: [G, R].

    Axis by axis with in-place min/max: three times faster than one [G, R, K, 3] pass on CPU.
    """
    oi = o * inv
    near = far = None
    for a in range(3):
        ia, oia = inv[..., a, None], oi[..., a, None]
        t0 = boxes[..., None, :, a] * ia - oia
        t1 = boxes[..., None, :, a + 3] * ia - oia
        lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1, out=t1)
        near = lo if near is None else torch.maximum(near, lo, out=near)
        far = hi if far is None else torch.minimum(far, hi, out=far)
    ok = (far >= near) & (near > EPS) & valid.unsqueeze(-2)
    return torch.where(ok, near, math.inf).min(-1)


def _sphere_hits(
    o: torch.Tensor, d: torch.Tensor, spheres: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest entry into spheres [G, S, 4] for rays o, d [G, R, 3] -> t, k: [G, R]."""
    oc = o.unsqueeze(-2) - spheres[..., None, :, :3]
    b = (oc * d.unsqueeze(-2)).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - spheres[..., None, :, 3] ** 2)
    t = -b - disc.clamp(min=0).sqrt()
    ok = (disc > 0) & (t > EPS) & valid.unsqueeze(-2)
    return torch.where(ok, t, math.inf).min(-1)


def _nearest(
    test, o: torch.Tensor, d: torch.Tensor, prims: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit distance and global id among candidate ids [G, K] (-1 padded, K may be 0)."""
    if ids.shape[-1] == 0:
        return torch.full(o.shape[:-1], math.inf, device=o.device), torch.full(
            o.shape[:-1], -1, dtype=torch.long, device=o.device
        )
    t, k = test(o, d, prims[ids.clamp(min=0)], ids >= 0)
    return t, ids.gather(-1, k)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d with zero components nudged, so the slab test never forms 0 * inf."""
    return 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)


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
            _swept(box_rects, box_shift), _swept(sphere_rects, sphere_shift), cell, self.device
        )

    # ------------------------------------------------------------------ tracing

    def trace(
        self, o: torch.Tensor, d: torch.Tensor, box_ids: torch.Tensor, sphere_ids: torch.Tensor
    ) -> Hits:
        """Nearest hit of rays [G, R, 3] among per-group candidates [G, K] / [G, S] (-1 = none)."""
        tb, box = _nearest(_box_hits, o, safe_inverse(d), self.ct.boxes, box_ids)
        ts, sphere = _nearest(_sphere_hits, o, d, self.ct.spheres, sphere_ids)
        tg = -o[..., 2] / d[..., 2]
        tg = torch.where((d[..., 2] < -1e-9) & (tg > EPS), tg, math.inf)
        t = torch.minimum(torch.minimum(tb, ts), tg)
        kind = torch.where(
            t == tb, BOX, torch.where(t == ts, SPHERE, torch.where(t == tg, GROUND, MISS))
        )
        kind = torch.where(t <= self.far, kind, MISS)
        index = torch.where(kind == BOX, box, torch.where(kind == SPHERE, sphere, -1))
        return Hits(torch.where(kind == MISS, math.inf, t), kind, index)

    def frustum_lists(
        self, w2c: np.ndarray, intr: Intrinsics, rects: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes and spheres inside each screen rectangle's frustum (and nearer than ``far``).

        ``rects`` [T, 4] holds pixel bounds u0, v0, u1, v1; returns ids [T, K], [T, S] padded
        with -1, valid ids first. The primitives are first culled against the frustum of the
        rectangles' bounding box, so the per-rectangle test costs rectangles x primitives in
        view, not x primitives in the city; what that drops lies outside every rectangle's
        frustum, so no ray through them could hit it.
        """
        bound = torch.cat([rects[:, :2].amin(0), rects[:, 2:].amax(0)])[None]
        box_mask, sphere_mask = self._frustum_masks(
            w2c, intr, bound, self.ct.boxes, self.ct.spheres
        )
        box_sub, sphere_sub = box_mask[0].nonzero()[:, 0], sphere_mask[0].nonzero()[:, 0]
        box_mask, sphere_mask = self._frustum_masks(
            w2c, intr, rects, self.ct.boxes[box_sub], self.ct.spheres[sphere_sub]
        )
        return _global(_compact(box_mask), box_sub), _global(_compact(sphere_mask), sphere_sub)

    def _frustum_masks(
        self,
        w2c: np.ndarray,
        intr: Intrinsics,
        rects: torch.Tensor,
        boxes: torch.Tensor,
        spheres: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks [T, B], [T, S]: which of ``boxes``, ``spheres`` each rectangle's frustum meets."""
        dev = self.device
        rot = torch.as_tensor(w2c[:3, :3], dtype=torch.float32, device=dev)
        centre = torch.as_tensor(-w2c[:3, :3].T @ w2c[:3, 3], dtype=torch.float32, device=dev)
        u0, v0, u1, v1 = rects.unbind(-1)
        us, vs = torch.stack([u0, u1, u1, u0], -1), torch.stack([v0, v0, v1, v1], -1)
        corners = torch.stack(
            [(us - intr.cx) / intr.fx, (vs - intr.cy) / intr.fy, torch.ones_like(us)], -1
        )  # [T, 4, 3] camera frame
        normals = torch.cross(corners, corners.roll(-1, dims=1), dim=-1)
        middle = corners.mean(1, keepdim=True)
        normals = normals * torch.sign((normals * middle).sum(-1, keepdim=True))
        normals = normals @ rot  # to world: R^T n
        normals = normals / normals.norm(dim=-1, keepdim=True)

        boxes = boxes - centre.repeat(2)
        lo, hi = boxes[:, :3], boxes[:, 3:]
        reach = sum(
            torch.maximum(normals[..., a, None] * lo[:, a], normals[..., a, None] * hi[:, a])
            for a in range(3)
        )  # [T, 4, B]: the farthest box corner along each inward normal
        nearest = torch.maximum(lo, -hi).clamp(min=0).norm(dim=-1)
        box_mask = (reach >= 0).all(1) & (nearest <= self.far)

        rel = spheres[:, :3] - centre
        dist = torch.einsum("tpa,sa->tps", normals, rel)
        sphere_mask = (dist >= -spheres[:, 3]).all(1) & (
            rel.norm(dim=-1) - spheres[:, 3] <= self.far
        )
        return box_mask, sphere_mask

    def trace_view(self, w2c: np.ndarray, intr: Intrinsics, dirs: torch.Tensor) -> Hits:
        """Rays from one camera's centre along world directions [N, 3] that lie in its image."""
        rects = torch.tensor([[0.0, 0.0, intr.width, intr.height]], device=self.device)
        box_ids, sphere_ids = self.frustum_lists(w2c, intr, rects)
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
            tb, _ = _box_hits(
                o[:, None],
                safe_inverse(d)[:, None],
                self.ct.boxes[box_ids.clamp(min=0)],
                box_ids >= 0,
            )
            ts, _ = _sphere_hits(
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

    # ------------------------------------------------------------------ shading

    def surface(
        self, o: torch.Tensor, d: torch.Tensor, hits: Hits
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Point, unit normal and albedo of each hit (rays [N, 3], every one a hit)."""
        p = o + hits.t[:, None] * d
        normal = torch.zeros_like(p)
        albedo = torch.zeros_like(p)
        ground = hits.kind == GROUND
        normal[ground, 2] = 1.0
        albedo[ground] = ground_albedo(self.ct, p[ground, 0], p[ground, 1])
        box = hits.kind == BOX
        if box.any():
            ids, pb = hits.index[box], p[box]
            b = self.ct.boxes[ids]
            face = torch.cat([(pb - b[:, :3]).abs(), (pb - b[:, 3:]).abs()], -1).argmin(-1)
            axis = face % 3
            nb = torch.zeros_like(pb)
            nb[torch.arange(len(pb), device=p.device), axis] = torch.where(face < 3, -1.0, 1.0)
            normal[box] = nb
            albedo[box] = box_albedo(self.ct, pb, axis, ids)
        sphere = hits.kind == SPHERE
        if sphere.any():
            ids, ps = hits.index[sphere], p[sphere]
            s = self.ct.spheres[ids]
            normal[sphere] = (ps - s[:, :3]) / s[:, 3:]
            albedo[sphere] = sphere_albedo(self.ct, ps, ids)
        return p, normal, albedo

    def lit(self, p: torch.Tensor, normal: torch.Tensor, albedo: torch.Tensor) -> torch.Tensor:
        """Sun (with a hard shadow ray) plus sky ambient, brighter on upward-facing surfaces."""
        sun = self.ct.sun
        cos = (normal @ sun).clamp(min=0)
        facing = cos > 0
        lit = torch.zeros_like(cos)
        origins = p[facing] + SHADOW_OFFSET * normal[facing]
        lit[facing] = (~self.occluded(origins, sun)).float()
        light = AMBIENT * (0.8 + 0.2 * normal[:, 2]) + SUN * cos * lit
        return albedo * light[:, None]

    def radiance(self, o: torch.Tensor, d: torch.Tensor, hits: Hits) -> torch.Tensor:
        """Colour of rays [N, 3]: lit surfaces fading into haze with distance, sky for misses."""
        rgb = sky(d)
        hit = hits.kind != MISS
        if hit.any():
            h = hits[hit]
            p, normal, albedo = self.surface(o[hit], d[hit], h)
            colour = self.lit(p, normal, albedo)
            keep = torch.exp(-h.t / self.geometry.haze)[:, None]
            horizon = torch.tensor(SKY_HORIZON, device=self.device)
            rgb[hit] = torch.lerp(horizon.expand_as(colour), colour, keep)
        return rgb

    def render(
        self, w2c: np.ndarray, intr: Intrinsics, samples: int = 1, tile: int = 32
    ) -> torch.Tensor:
        """Image [H, W, 3] in [0, 1] of one view.

        With ``samples`` > 1, pixels on an edge (another primitive or a colour step next to
        them) are rendered again with samples x samples rays and averaged: anti-aliasing where
        it shows, at a fraction of the cost of supersampling every pixel.
        """
        dev = self.device
        h, w = intr.height, intr.width
        tx, ty = -(-w // tile), -(-h // tile)
        iy, ix = torch.meshgrid(
            torch.arange(ty, device=dev), torch.arange(tx, device=dev), indexing="ij"
        )
        u0, v0 = (ix.reshape(-1) * tile).float(), (iy.reshape(-1) * tile).float()
        lists = self.frustum_lists(w2c, intr, torch.stack([u0, v0, u0 + tile, v0 + tile], -1))
        py, px = torch.meshgrid(
            torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij"
        )
        centre = torch.tensor([[0.5, 0.5]], device=dev)
        rgb, ident = self._pixels(w2c, intr, lists, tile, px.reshape(-1), py.reshape(-1), centre)
        rgb, ident = rgb.reshape(h, w, 3), ident.reshape(h, w)
        if samples > 1:
            ey, ex = _edges(rgb, ident).nonzero(as_tuple=True)
            grid = (torch.arange(samples, device=dev, dtype=torch.float32) + 0.5) / samples
            gy, gx = torch.meshgrid(grid, grid, indexing="ij")
            offsets = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
            sub, _ = self._pixels(w2c, intr, lists, tile, ex, ey, offsets)
            rgb[ey, ex] = sub.mean(1)
        return rgb

    def _pixels(
        self,
        w2c: np.ndarray,
        intr: Intrinsics,
        lists: tuple[torch.Tensor, torch.Tensor],
        tile: int,
        px: torch.Tensor,
        py: torch.Tensor,
        offsets: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour [M, S, 3] and primitive id [M, S] of rays through pixels (px, py) [M] at
        sub-pixel offsets [S, 2], each traced against its screen tile's candidates."""
        dev = self.device
        box_ids, sphere_ids = lists
        m, s = len(px), len(offsets)
        tx = -(-intr.width // tile)
        tile_of = (py // tile) * tx + px // tile
        order = torch.argsort(tile_of, stable=True)
        counts = torch.bincount(tile_of, minlength=len(box_ids))
        starts = torch.cumsum(counts, 0) - counts
        nb, ns = (box_ids >= 0).sum(1), (sphere_ids >= 0).sum(1)
        rot = torch.as_tensor(w2c[:3, :3], dtype=torch.float32, device=dev)
        centre = torch.as_tensor(-w2c[:3, :3].T @ w2c[:3, 3], dtype=torch.float32, device=dev)
        rgb = torch.zeros(m, s, 3, device=dev)
        ident = torch.zeros(m, s, dtype=torch.long, device=dev)
        busy = (counts > 0).nonzero()[:, 0]
        for group in _batches(busy, nb + ns, counts * s, self.pair_budget):
            cnt = counts[group]
            j = torch.arange(int(cnt.max()), device=dev)
            valid = j < cnt[:, None]  # [G, r]
            pix = order[starts[group, None] + torch.minimum(j, cnt[:, None] - 1)]
            u = px[pix, None].float() + offsets[:, 0]  # [G, r, S]
            v = py[pix, None].float() + offsets[:, 1]
            cam = torch.stack(
                [(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, torch.ones_like(u)], -1
            )
            d = cam.reshape(len(group), -1, 3) @ rot
            d = d / d.norm(dim=-1, keepdim=True)
            o = centre.expand_as(d)
            kb, ks = int(nb[group].max()), int(ns[group].max())
            hits = self.trace(o, d, box_ids[group, :kb], sphere_ids[group, :ks])
            keep = valid[..., None].expand(-1, -1, s).reshape(len(group), -1)
            hits = hits[keep]
            target = pix[valid]
            rgb[target] = self.radiance(o[keep], d[keep], hits).reshape(-1, s, 3)
            ident[target] = (hits.kind * 2**32 + hits.index + 1).reshape(-1, s)
        return rgb, ident


def _swept(rects: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Bounding rectangles of ``rects`` together with their translates by ``shift``."""
    moved = rects + np.concatenate([shift, shift], axis=1)
    return np.concatenate(
        [np.minimum(rects[:, :2], moved[:, :2]), np.maximum(rects[:, 2:], moved[:, 2:])], axis=1
    )


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """Row-wise ids of true entries of mask [T, N], valid first, padded with -1 to the max count."""
    n = mask.shape[1]
    k = max(int(mask.sum(1).max()) if mask.numel() else 0, 1)
    ids = torch.arange(n, device=mask.device).expand_as(mask)
    ids = torch.where(mask, ids, n).sort(dim=1).values[:, :k]
    return torch.where(ids < n, ids, -1)


def _global(ids: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Ids into ``subset`` (-1 padded) as ids into the whole set; ascending stays ascending."""
    if len(subset) == 0:
        return torch.full_like(ids, -1)
    return torch.where(ids >= 0, subset[ids.clamp(min=0)], -1)


def _batches(
    tiles: torch.Tensor, load: torch.Tensor, rays: torch.Tensor, budget: int
) -> list[torch.Tensor]:
    """Group tiles so each group's padded rays x candidates stays within the budget.

    Tiles are ordered by candidate count (in powers of two), then by ray count, so the tiles
    of a group are padded to similar sizes.
    """
    ids, load_l, rays_l = tiles.tolist(), load[tiles].tolist(), rays[tiles].tolist()
    order = sorted(range(len(ids)), key=lambda i: (load_l[i].bit_length(), rays_l[i]))
    groups, current, kmax, rmax = [], [], 0, 0
    for i in order:
        k, r = max(kmax, load_l[i]), max(rmax, rays_l[i])
        if current and (len(current) + 1) * r * (k + 8) > budget:
            groups.append(current)
            current, k, r = [], load_l[i], rays_l[i]
        current.append(ids[i])
        kmax, rmax = k, r
    if current:
        groups.append(current)
    return [torch.tensor(g, device=tiles.device) for g in groups]


def _edges(rgb: torch.Tensor, ident: torch.Tensor, step: float = 0.05) -> torch.Tensor:
    """Pixels [H, W] beside a neighbour that shows another primitive or differs by > step."""
    edge = torch.zeros_like(ident, dtype=torch.bool)
    across = (ident[:, 1:] != ident[:, :-1]) | ((rgb[:, 1:] - rgb[:, :-1]).abs().amax(-1) > step)
    down = (ident[1:] != ident[:-1]) | ((rgb[1:] - rgb[:-1]).abs().amax(-1) > step)
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    edge[1:] |= down
    edge[:-1] |= down
    return edge
