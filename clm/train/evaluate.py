"""Held-out evaluation: PSNR, SSIM (and LPIPS where its weights exist offline), with renders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clm.data.images import ImageCache
from clm.data.types import Frame
from clm.engine.base import Engine
from clm.files import save_png
from clm.metrics import load_lpips, psnr, ssim
from clm.train.views import frame_to_view


def to_uint8(image: Tensor) -> np.ndarray:
    return (image.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def evaluate(
    engine: Engine,
    frames: Sequence[Frame],
    images: ImageCache,
    image_ids: Sequence[int],
    sh_degree: int,
    background: Tensor,
    render_dir: Path | None = None,
    with_lpips: bool = False,
) -> dict[str, Any]:
    """Mean and per-image metrics over ``frames`` (``image_ids`` index them in ``images``)."""
    lpips_fn, lpips_note = load_lpips(engine.device) if with_lpips else (None, None)
    if render_dir is not None:
        render_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for frame, image_id in zip(frames, image_ids, strict=True):
        view = frame_to_view(frame, engine.device)
        pred = engine.render(view, sh_degree, background).image[..., :3].clamp(0, 1)
        target = torch.from_numpy(np.array(images.get(image_id))).to(engine.device) / 255.0
        row = {
            "name": frame.name,
            "psnr": float(psnr(pred, target)),
            "ssim": float(ssim(pred, target)),
        }
        if lpips_fn is not None:
            row["lpips"] = float(lpips_fn(pred, target))
        rows.append(row)
        if render_dir is not None:
            stem = Path(frame.name).with_suffix("").as_posix().replace("/", "_")
            save_png(render_dir / f"{stem}.png", to_uint8(pred))
    result: dict[str, Any] = {"num_images": len(rows)}
    for key in ("psnr", "ssim"):
        result[key] = float(np.mean([r[key] for r in rows])) if rows else None
    if with_lpips:
        result["lpips"] = float(np.mean([r["lpips"] for r in rows])) if lpips_fn and rows else None
        if lpips_fn is None:
            result["lpips_note"] = lpips_note
    result["per_image"] = rows
    return result
