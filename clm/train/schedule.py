"""What changes with the step: learning rates, Adam betas under batching, the SH degree.

The 3DGS recipe is stated per image (densify every 100 images, SH degree up every 1000). With
``--batch-size B`` one optimiser step consumes B images, so those intervals are divided by B, and
the hyper-parameters follow Grendel-GS: learning rates times sqrt(B), Adam betas to the power B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clm.model.spec import AttributeSpec, GaussianSpec


def images_to_steps(images: int, batch_size: int) -> int:
    """An interval stated in images, as optimiser steps (at least 1 when non-zero)."""
    if images <= 0:
        return 0
    return max(1, round(images / batch_size))


@dataclass(frozen=True)
class LearningRates:
    """Per-attribute Adam learning rate at each optimiser step (1-based)."""

    spec: GaussianSpec
    total_steps: int
    extent: float = 1.0
    batch_size: int = 1

    def base(self, attr: AttributeSpec) -> tuple[float, float | None]:
        scale = math.sqrt(self.batch_size) * (self.extent if attr.scale_lr_by_extent else 1.0)
        final = None if attr.lr_final is None else attr.lr_final * scale
        return attr.lr * scale, final

    def at(self, name: str, step: int) -> float:
        """The rate in force for ``step``; decaying ones fall log-linearly to ``lr_final``."""
        lr, final = self.base(self.spec[name])
        if final is None:
            return lr
        frac = min(max((step - 1) / max(self.total_steps - 1, 1), 0.0), 1.0)
        return lr * (final / lr) ** frac


def adam_betas(batch_size: int, betas: tuple[float, float] = (0.9, 0.999)) -> tuple[float, float]:
    """Grendel-GS: one step over B images weighs history like B steps of one image."""
    return betas[0] ** batch_size, betas[1] ** batch_size


def sh_degree_at(step: int, batch_size: int, max_degree: int, every_images: int = 1000) -> int:
    """Active SH degree: one band more every ``every_images`` images, up to ``max_degree``."""
    if every_images <= 0:
        return max_degree
    images_seen = (step - 1) * batch_size
    return min(max_degree, images_seen // every_images)
