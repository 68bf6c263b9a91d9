"""What a splatting method is to the trainer: everything a variant differs by, in one object.

The trainer, the engines, the planner and density control know a method only through this
interface and the :class:`~clm.model.spec.GaussianSpec` it declares (whose ``cull`` roles say
which attributes culling, pruning and opacity resets read, and which culling bound holds).
They never name a method's attributes themselves, so a variant with other attributes, another
renderer or another loss trains, offloads, checkpoints and exports without touching them.

A method is a dataclass: its fields are its options (``clm-train --method-option NAME=VALUE``),
with defaults that are its published recipe.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from clm.data.types import Similarity
from clm.engine.base import RowSource
from clm.errors import ClmError
from clm.methods.ply_rows import export_ply, ply_source
from clm.metrics import SSIM_WINDOW, ssim
from clm.model.spec import GaussianSpec
from clm.render.base import RenderFn, RenderOutput, View


def photometric_loss(pred: Tensor, target: Tensor, ssim_weight: float = 0.2) -> Tensor:
    """The 3DGS image loss, (1 - λ)·L1 + λ·(1 - SSIM), of ``[H, W, 3]`` images in [0, 1]."""
    l1 = torch.abs(pred - target).mean()
    if ssim_weight == 0:
        return l1
    return (1.0 - ssim_weight) * l1 + ssim_weight * (1.0 - ssim(pred, target))


def photometric_reach(ssim_weight: float) -> int:
    """How many pixels away :func:`photometric_loss`'s gradient at a pixel looks: SSIM's
    statistics at a pixel cover its window, and a pixel's gradient comes from every window
    it is in, so twice the window's half-width (L1 alone looks nowhere else)."""
    return 2 * (SSIM_WINDOW // 2) if ssim_weight != 0 else 0


@dataclasses.dataclass(frozen=True)
class Method(ABC):
    """A splatting variant: attributes, initialisation, renderer, loss, densification and PLY.

    Renders put RGB in the first three channels of ``RenderOutput.image``; a method may append
    channels its loss reads (``renderer(training=True)``), which evaluation and viewers ignore.
    """

    name: ClassVar[str]
    summary: ClassVar[str]

    ssim_weight: float = 0.2

    # ---- attributes and their initial values ----------------------------------------------

    @abstractmethod
    def spec(self, sh_degree: int) -> GaussianSpec:
        """The attributes at this SH degree, with learning rates and culling roles."""

    @abstractmethod
    def initial_params(
        self, spec: GaussianSpec, points: np.ndarray, colors: np.ndarray, init_opacity: float
    ) -> dict[str, Tensor]:
        """Raw parameters ``[N, *shape]`` (float32, CPU) from a point cloud (uint8 colours)."""

    # ---- rendering and the loss -----------------------------------------------------------

    @abstractmethod
    def renderer(
        self, device: torch.device, depth: bool = False, training: bool = False
    ) -> RenderFn:
        """The renderer on ``device`` (CUDA, or the CPU twin elsewhere). ``depth`` adds the
        expected depth as the fourth channel; ``training`` whatever channels :meth:`loss` reads."""

    def normals(self, out: RenderOutput) -> Tensor | None:
        """World-frame normals ``[H, W, 3]`` (alpha-weighted) of a ``training`` render, for a
        method that renders them; None otherwise."""
        return None

    def loss(self, out: RenderOutput, target: Tensor, view: View, images: int) -> Tensor:
        """The loss of one view, from a ``training`` render; ``images``: the images training
        has taken, this step's included (the recipe's iteration at batch size 1)."""
        return photometric_loss(out.image[..., :3], target, self.ssim_weight)

    def loss_reach(self) -> int | None:
        """How many pixels away the gradient of :meth:`loss` at a pixel looks, when the loss
        is a mean over the image's pixels of terms that each look that far at most; None
        when it is not such a mean. A view rendered in pieces then trains in one pass, each
        piece cropping its render with this margin (:class:`clm.engine.base.LocalLoss`),
        instead of two. A subclass with a loss of its own says its reach, or gets None."""
        if type(self).loss is not Method.loss:
            return None
        return photometric_reach(self.ssim_weight)

    # ---- density control ------------------------------------------------------------------

    # Attributes :meth:`split` reads from the parents (key ones and host ones alike).
    split_reads: ClassVar[tuple[str, ...]] = ()

    def densify_gradient(self, out: RenderOutput) -> Tensor | None:
        """The per-drawn-row screen-space gradient ``[M, 2]`` that drives densification
        (after backward), or None when this render gave none."""
        return out.means2d.grad

    @abstractmethod
    def split(
        self, spec: GaussianSpec, parents: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Two children per parent (rows ``[2n]``, first children then second), as overrides
        of key attributes; every other attribute is copied from the parent. ``parents``
        holds :attr:`split_reads` of the rows being split."""

    # ---- files ----------------------------------------------------------------------------

    def to_world(
        self, spec: GaussianSpec, params: Mapping[str, Tensor], to_train: Similarity
    ) -> dict[str, np.ndarray]:
        """Parameters in the scene's own frame, for a PLY: training works in a normalised
        frame (``x_train = s·(x_world - c)``); a uniform scale and a translation change
        positions and log-scales only."""
        out = {k: v.detach().cpu().float().numpy() for k, v in params.items()}
        position, log_scales = spec.cull.position, spec.cull.log_scales
        out[position] = to_train.to_world(out[position].astype(np.float64)).astype(np.float32)
        out[log_scales] = out[log_scales] - np.float32(math.log(to_train.scale))
        return out

    def from_world(
        self, spec: GaussianSpec, splats: Mapping[str, np.ndarray], to_train: Similarity
    ) -> dict[str, Tensor]:
        """The inverse of :meth:`to_world`, fitted to ``spec``: extra SH bands are cut off,
        missing ones and attributes the file lacks are zeros."""
        n = len(next(iter(splats.values())))
        params = {}
        for attr in spec:
            value = splats.get(attr.name)
            if value is None:
                params[attr.name] = torch.zeros(n, *attr.shape)
                continue
            value = torch.as_tensor(np.asarray(value, dtype=np.float32))
            if attr.sh_rest and tuple(value.shape[1:]) != attr.shape:
                fitted = torch.zeros(n, *attr.shape)
                keep = min(attr.shape[0], value.shape[1])
                fitted[:, :keep] = value[:, :keep]
                value = fitted
            if tuple(value.shape[1:]) != attr.shape:
                raise ClmError(
                    f"the file's {attr.name} has shape {tuple(value.shape[1:])}; "
                    f"{self.name} wants {attr.shape}"
                )
            params[attr.name] = value
        position, log_scales = spec.cull.position, spec.cull.log_scales
        means = to_train.to_train(np.asarray(splats[position], dtype=np.float64))
        params[position] = torch.as_tensor(means.astype(np.float32))
        params[log_scales] = params[log_scales] + math.log(to_train.scale)
        return params

    def export_ply(
        self,
        path: Path,
        spec: GaussianSpec,
        chunks: Iterable[Mapping[str, Tensor]],
        count: int,
        to_train: Similarity,
    ) -> tuple[int, int]:
        """Write parameter chunks (training frame) as this method's PLY; returns (written,
        dropped non-finite)."""
        return export_ply(path, (self.to_world(spec, c, to_train) for c in chunks), count)

    def ply_source(self, path: Path, spec: GaussianSpec, to_train: Similarity) -> RowSource:
        """A PLY's splats as raw parameters in the training frame, streamed from disk."""
        return ply_source(path, lambda splats: self.from_world(spec, splats, to_train))

    # ---- options --------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """The option fields and their values (recorded in checkpoints and config.json)."""
        return dataclasses.asdict(self)
