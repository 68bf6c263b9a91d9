"""The COLMAP sparse model in memory: cameras, images and points with their tracks, COLMAP's
camera models, and its quaternion convention."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clm.errors import ClmError

# COLMAP's camera models: id -> (name, number of parameters), as in COLMAP's sensor/models.h.
CAMERA_MODELS: dict[int, tuple[str, int]] = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
    12: ("SIMPLE_DIVISION", 4),
    13: ("DIVISION", 5),
    14: ("SIMPLE_FISHEYE", 3),
    15: ("FISHEYE", 4),
    16: ("EUCM", 6),
    17: ("EQUIRECTANGULAR", 2),
}
MODEL_IDS: dict[str, int] = {name: model_id for model_id, (name, _) in CAMERA_MODELS.items()}


@dataclass(eq=False)
class ColmapCamera:
    id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # float64, CAMERA_MODELS[model][1] values


@dataclass(eq=False)
class ColmapImage:
    id: int
    qvec: np.ndarray  # (w, x, y, z), world-to-camera rotation
    tvec: np.ndarray  # world-to-camera translation
    camera_id: int
    name: str
    xys: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [K, 2] float64
    point3d_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # -1: none

    def world_to_camera(self) -> np.ndarray:
        """The 4x4 OpenCV world-to-camera matrix that COLMAP's qvec/tvec encode."""
        out = np.eye(4)
        out[:3, :3] = qvec_to_rotmat(self.qvec)
        out[:3, 3] = self.tvec
        return out


@dataclass(eq=False)
class ColmapPoints:
    """The 3D points with their tracks in CSR form: point i owns the next track_lengths[i]
    (image id, 2D point index) pairs, so a million points need no per-point Python objects."""

    ids: np.ndarray  # int64 [P]
    xyz: np.ndarray  # float64 [P, 3]
    rgb: np.ndarray  # uint8 [P, 3]
    errors: np.ndarray  # float64 [P]
    track_lengths: np.ndarray  # int64 [P]
    track_image_ids: np.ndarray  # int32 [T]
    track_point2d_idx: np.ndarray  # int32 [T]

    @classmethod
    def empty(cls) -> ColmapPoints:
        return cls(
            ids=np.zeros(0, np.int64),
            xyz=np.zeros((0, 3)),
            rgb=np.zeros((0, 3), np.uint8),
            errors=np.zeros(0),
            track_lengths=np.zeros(0, np.int64),
            track_image_ids=np.zeros(0, np.int32),
            track_point2d_idx=np.zeros(0, np.int32),
        )

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(eq=False)
class ColmapModel:
    cameras: dict[int, ColmapCamera]
    images: dict[int, ColmapImage]
    points: ColmapPoints


def qvec_to_rotmat(qvec: np.ndarray) -> np.ndarray:
    """Rotation matrix of a (w, x, y, z) quaternion; normalises it first, as COLMAP does."""
    w, x, y, z = np.asarray(qvec, dtype=np.float64) / np.linalg.norm(qvec)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def rotmat_to_qvec(rot: np.ndarray) -> np.ndarray:
    """Unit (w, x, y, z) quaternion with w >= 0 of a rotation matrix.

    Takes the eigenvector of the symmetric 4x4 matrix whose largest eigenvalue belongs to
    the quaternion, which stays accurate for every rotation angle (no division by a small
    trace as in the textbook formula).
    """
    r = np.asarray(rot, dtype=np.float64)
    k = (
        np.array(
            [
                [r[0, 0] - r[1, 1] - r[2, 2], 0, 0, 0],
                [r[1, 0] + r[0, 1], r[1, 1] - r[0, 0] - r[2, 2], 0, 0],
                [r[2, 0] + r[0, 2], r[2, 1] + r[1, 2], r[2, 2] - r[0, 0] - r[1, 1], 0],
                [r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1], np.trace(r)],
            ]
        )
        / 3.0
    )
    values, vectors = np.linalg.eigh(k, UPLO="L")
    x, y, z, w = vectors[:, np.argmax(values)]
    q = np.array([w, x, y, z])
    return -q if w < 0 else q


def check_camera(path: Path, camera: ColmapCamera) -> None:
    if camera.model not in MODEL_IDS:
        raise ClmError(f"{path}: camera {camera.id} has unknown model {camera.model!r}")
    expected = CAMERA_MODELS[MODEL_IDS[camera.model]][1]
    if len(camera.params) != expected:
        raise ClmError(
            f"{path}: camera {camera.id} ({camera.model}) has {len(camera.params)} "
            f"parameters, expected {expected}"
        )
