"""The in-memory form of a scene that every reader produces and the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Distortion:
    """Lens distortion of a COLMAP/OpenCV camera, removed when the image is decoded.

    ``model`` is one of ``SIMPLE_RADIAL`` (k1), ``RADIAL`` (k1, k2) and ``OPENCV``
    (k1, k2, p1, p2), with ``params`` in that order. ``fx, fy, cx, cy`` and
    ``width``/``height`` describe the distorted image as it is undistorted: the file after any
    resize, with the pixel-edge convention (the first pixel's centre is at 0.5). The Frame's
    own ``K`` and size are the undistorted pinhole image's, which these determine.
    """

    model: str
    params: tuple[float, ...]
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int


@dataclass(frozen=True, eq=False)
class Frame:
    """One posed image, in the training frame (see :class:`Similarity`).

    ``K`` and ``width``/``height`` describe the image at the resolution that is trained
    (after ``--data-factor``). ``world_to_camera`` uses the OpenCV convention: x right,
    y down, z forward.
    """

    name: str
    image_path: Path
    width: int
    height: int
    K: np.ndarray  # [3, 3] float64
    world_to_camera: np.ndarray  # [4, 4] float64
    distortion: Distortion | None = None
    camera_id: int = 0
    # The file's own (width, height) when it must be resized on decode (no images_F folder).
    resize_from: tuple[int, int] | None = None

    @property
    def camera_center(self) -> np.ndarray:
        """The camera's position in the training frame."""
        rot = self.world_to_camera[:3, :3]
        return -rot.T @ self.world_to_camera[:3, 3]


@dataclass(frozen=True)
class Similarity:
    """``x_train = scale * (x_world - center)``: the normalisation training works in.

    Export undoes it, so a PLY lines up with the user's own model.
    """

    scale: float = 1.0
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def to_train(self, points: np.ndarray) -> np.ndarray:
        return (points - self.center) * self.scale

    def to_world(self, points: np.ndarray) -> np.ndarray:
        return points / self.scale + self.center

    def pose_to_train(self, world_to_camera: np.ndarray) -> np.ndarray:
        """World-to-camera matrix for training-frame points, in training units."""
        out = np.array(world_to_camera, dtype=np.float64, copy=True)
        rot, trans = out[:3, :3], out[:3, 3]
        out[:3, 3] = self.scale * (rot @ self.center + trans)
        return out


@dataclass
class Scene:
    """A scene ready to train: frames split into train and test, and the initial points."""

    root: Path
    kind: str  # "colmap", "blender" or "nerfstudio"
    train: list[Frame]
    test: list[Frame]
    points: np.ndarray  # [P, 3] float32, training frame
    colors: np.ndarray  # [P, 3] uint8
    to_train: Similarity
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # Radius of the training cameras around their centre, times 1.1 (INRIA's cameras_extent),
    # in training units: scales the position learning rate and the densification thresholds.
    extent: float = 1.0
    # True when the points are a random initialisation (no SfM points in the scene).
    random_init: bool = False
