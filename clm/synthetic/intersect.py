"""Ray intersection kernels of the city's ray caster: boxes (slab test), spheres, and the hit
record they produce."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MISS, GROUND, BOX, SPHERE = 0, 1, 2, 3  # what a ray hit
EPS = 1e-4  # nearest accepted hit distance


@dataclass
class Hits:
    """Nearest hit per ray: distance (inf on a miss), what was hit, and which one."""

    t: torch.Tensor
    kind: torch.Tensor
    index: torch.Tensor

    def __getitem__(self, key: torch.Tensor) -> Hits:
        return Hits(self.t[key], self.kind[key], self.index[key])


def box_hits(
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


def sphere_hits(
    o: torch.Tensor, d: torch.Tensor, spheres: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest entry into spheres [G, S, 4] for rays o, d [G, R, 3] -> t, k: [G, R]."""
    oc = o.unsqueeze(-2) - spheres[..., None, :, :3]
    b = (oc * d.unsqueeze(-2)).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - spheres[..., None, :, 3] ** 2)
    t = -b - disc.clamp(min=0).sqrt()
    ok = (disc > 0) & (t > EPS) & valid.unsqueeze(-2)
    return torch.where(ok, t, math.inf).min(-1)


def nearest_hit(
    test, o: torch.Tensor, d: torch.Tensor, prims: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit distance and global id among candidate ids [G, K] (-1 padded, K may be 0),
    by ``test`` (:func:`box_hits` or :func:`sphere_hits`)."""
    if ids.shape[-1] == 0:
        return torch.full(o.shape[:-1], math.inf, device=o.device), torch.full(
            o.shape[:-1], -1, dtype=torch.long, device=o.device
        )
    t, k = test(o, d, prims[ids.clamp(min=0)], ids >= 0)
    return t, ids.gather(-1, k)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d with zero components nudged, so the slab test never forms 0 * inf."""
    return 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
