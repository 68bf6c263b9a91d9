"""Per-attribute Adam learning rates by step, and Adam's hyper-parameters under batching.

With ``--batch-size B`` one optimiser step consumes B images; the hyper-parameters follow
Grendel-GS: learning rates times sqrt(B), Adam betas to the power B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clm.model.spec import AttributeSpec, GaussianSpec


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
