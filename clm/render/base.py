"""The renderer interface the engines drive: raw parameters and one camera in, an image out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class View:
    """One camera: world-to-camera ``viewmat [4, 4]`` (OpenCV axes) and intrinsics ``K [3, 3]``."""

    viewmat: Tensor
    K: Tensor
    width: int
    height: int

    @property
    def camera_center(self) -> Tensor:
        rot, trans = self.viewmat[:3, :3], self.viewmat[:3, 3]
        return -rot.T @ trans

    def to(self, device: torch.device | str) -> View:
        return View(self.viewmat.to(device), self.K.to(device), self.width, self.height)

    def crop(self, x0: int, y0: int, x1: int, y1: int) -> View:
        """The camera of pixels ``[x0, x1) x [y0, y1)``: each sees the same ray as here."""
        K = self.K.clone()
        K[0, 2] -= x0
        K[1, 2] -= y0
        return View(self.viewmat, K, x1 - x0, y1 - y0)


@dataclass
class RenderOutput:
    """What a render gives back.

    ``means2d`` holds the screen-space centres of the Gaussians that reached the image, rows of
    the input given by ``ids``; after backward its ``.grad`` drives densification.
    """

    image: Tensor  # [H, W, C]
    alpha: Tensor  # [H, W, 1]
    means2d: Tensor  # [M, 2]
    radii: Tensor  # [M, 2] int32, pixels
    ids: Tensor  # [M] int64


class RenderFn(Protocol):
    """A splatting variant's renderer: raw (pre-activation) parameters, as the spec names them."""

    def __call__(
        self, params: Mapping[str, Tensor], view: View, sh_degree: int, background: Tensor
    ) -> RenderOutput: ...


@dataclass(frozen=True)
class Reach:
    """Which of a render's rows reach its image, found before the render (one per row)."""

    drawn: Tensor  # [N] bool: projected onto the image (a non-zero radius)
    read: Tensor  # [N] bool: composited by some pixel, at most: no other row's colour is read


@dataclass(frozen=True)
class ReachFinder:
    """What a renderer declares it reads: ``find(params, view)``, from the attributes named in
    ``reads`` alone (raw values, as the render takes them), before the others are fetched.
    Rows outside ``read`` can be left out of the render without changing the image or any
    gradient (:mod:`clm.render.reach`)."""

    find: Callable[[Mapping[str, Tensor], View], Reach]
    reads: tuple[str, ...]


def reach_of(render_fn: RenderFn) -> ReachFinder | None:
    """The reach a renderer declares (its ``reach`` attribute), or None: it may read every
    row it is given."""
    return getattr(render_fn, "reach", None)
