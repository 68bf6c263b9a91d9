"""One viewer frame: what a browser's camera sees, rendered through the engine like any view (with
offloading, its rows are culled and gathered as a training view's are)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from clm.engine.base import Engine
from clm.train.evaluate import to_uint8
from clm.viewer.camera import ViewerCamera, camera_to_view, frame_size


def default_max_side(device: torch.device) -> int:
    """The longer side of a frame until the page's slider changes it: the CPU renders slowly."""
    return 1024 if device.type == "cuda" else 512


def pixel_cap(largest_image: int, max_gpu_gb: float | None, device: torch.device) -> int | None:
    """The most pixels a frame may have: under a GPU budget, the engine was planned for images
    no larger than the largest of the scene's (a hard limit); otherwise the slider alone."""
    return largest_image if max_gpu_gb is not None and device.type == "cuda" else None


@torch.no_grad()
def render_frame(
    engine: Engine,
    camera: ViewerCamera,
    sh_degree: int,
    background: Tensor,
    max_side: int,
    max_pixels: int | None = None,
) -> np.ndarray:
    """uint8 ``[H, W, 3]`` at the canvas's aspect, at most ``max_side`` pixels on its longer
    side and ``max_pixels`` in all (see :func:`pixel_cap`)."""
    size = frame_size(camera.width, camera.height, max_side, max_pixels)
    view = camera_to_view(camera, size, engine.device)
    return to_uint8(engine.render(view, sh_degree, background).image[..., :3])
