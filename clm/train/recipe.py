"""The 3DGS recipe's intervals, stated per image (densify every 100 images, SH degree up every
1000): with ``--batch-size B`` one optimiser step consumes B images, so they are divided by B.
The learning rates and Adam betas under batching are in :mod:`clm.optim.learning_rates`.
"""

from __future__ import annotations


def images_to_steps(images: int, batch_size: int) -> int:
    """An interval stated in images, as optimiser steps (at least 1 when non-zero)."""
    if images <= 0:
        return 0
    return max(1, round(images / batch_size))


def sh_degree_at(step: int, batch_size: int, max_degree: int, every_images: int = 1000) -> int:
    """Active SH degree: one band more every ``every_images`` images, up to ``max_degree``."""
    if every_images <= 0:
        return max_degree
    images_seen = (step - 1) * batch_size
    return min(max_degree, images_seen // every_images)
