"""The browser's camera as a clm View, and a training camera as the browser's starting pose.

viser reports each browser's camera as ``wxyz`` and ``position``: the rotation and translation
of ``p_world = R p_camera + t``, with OpenCV axes (x right, y down, z forward), as clm's own
cameras; its ``fov`` is the vertical field of view in radians, and the image size is the
canvas's. The viewer's world is the training frame, so no other transform applies. numpy and
torch only: this module knows cameras, not viser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clm.render.base import View
from clm.render.camera_path import camera_center, focus_point, quat_to_rotation, scene_up


@dataclass(frozen=True)
class ViewerCamera:
    """One browser camera as viser reports it (see the module docstring)."""

    wxyz: tuple[float, float, float, float]
    position: tuple[float, float, float]
    fov: float  # vertical, radians
    width: int  # canvas pixels
    height: int


@dataclass(frozen=True)
class StartPose:
    """Where a browser's camera starts: at the first training camera, looking along its axis at
    the depth of the point the training cameras look at (the point the browser orbits), upright
    as the training cameras are."""

    position: np.ndarray
    look_at: np.ndarray
    up: np.ndarray
    fov: float


def frame_size(width: int, height: int, max_side: int, max_pixels: int | None) -> tuple[int, int]:
    """The canvas's aspect at most ``max_side`` pixels on its longer side and, where given,
    ``max_pixels`` in all."""
    scale = min(1.0, max_side / max(width, height))
    if max_pixels is not None:
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    return max(1, int(width * scale)), max(1, int(height * scale))


def camera_to_view(
    camera: ViewerCamera, size: tuple[int, int], device: torch.device | str = "cpu"
) -> View:
    """The View that renders what the browser's camera sees, at ``size`` (width, height)."""
    width, height = size
    camera_to_world = np.eye(4)
    camera_to_world[:3, :3] = quat_to_rotation(np.asarray(camera.wxyz, dtype=np.float64))
    camera_to_world[:3, 3] = camera.position
    focal = 0.5 * height / math.tan(0.5 * camera.fov)
    K = np.array([[focal, 0.0, 0.5 * width], [0.0, focal, 0.5 * height], [0.0, 0.0, 1.0]])
    return View(
        torch.as_tensor(np.linalg.inv(camera_to_world), dtype=torch.float32, device=device),
        torch.as_tensor(K, dtype=torch.float32, device=device),
        width,
        height,
    )


def start_pose(poses: Sequence[np.ndarray], K: np.ndarray, height: int) -> StartPose:
    """The browser's first pose from the training cameras' world-to-camera ``poses`` and the
    first one's intrinsics ``K`` and image height."""
    position = camera_center(poses[0])
    forward = poses[0][2, :3]
    depth = float((focus_point(poses) - position) @ forward)
    look_at = position + forward * (depth if depth > 1e-6 else 1.0)
    fov = 2.0 * math.atan(0.5 * height / float(K[1, 1]))
    return StartPose(position, look_at, scene_up(poses), fov)
