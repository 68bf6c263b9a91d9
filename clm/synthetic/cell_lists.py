"""Per-cell candidate lists over a 2D grid on the ground: which boxes and spheres a shadow ray
or an inside-test at a given (x, y) needs to look at."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CellLists:
    """A 2D grid over the ground; each cell lists (padded with -1) the primitives touching it."""

    origin: tuple[float, float]
    cell: float
    shape: tuple[int, int]
    boxes: torch.Tensor  # [cells, K]
    spheres: torch.Tensor  # [cells, S]

    def lookup(self, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box and sphere candidates [N, K], [N, S] of points [N, 2+]; none outside the grid."""
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


def swept_rects(rects: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Bounding rectangles of ``rects`` together with their translates by ``shift``."""
    moved = rects + np.concatenate([shift, shift], axis=1)
    return np.concatenate(
        [np.minimum(rects[:, :2], moved[:, :2]), np.maximum(rects[:, 2:], moved[:, 2:])], axis=1
    )
