"""The 3DGS photometric loss: (1 - λ)·L1 + λ·(1 - SSIM)."""

from __future__ import annotations

import torch
from torch import Tensor

from clm.metrics import ssim


def photometric_loss(pred: Tensor, target: Tensor, ssim_weight: float = 0.2) -> Tensor:
    """Images ``[H, W, 3]`` in [0, 1]; a scalar to minimise."""
    l1 = torch.abs(pred - target).mean()
    if ssim_weight == 0:
        return l1
    return (1.0 - ssim_weight) * l1 + ssim_weight * (1.0 - ssim(pred, target))
