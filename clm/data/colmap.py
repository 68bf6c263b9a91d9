"""COLMAP sparse models (cameras, images, points3D) in COLMAP's binary and text formats.

Reading is strict: a short, corrupt or inconsistent file raises :class:`ClmError` with the
file and the record where it went wrong, because a half-read model trains silently wrong. The
model's types are in :mod:`clm.data.colmap_model`, each format in :mod:`clm.data.colmap_binary`
and :mod:`clm.data.colmap_text`; this module finds a model and picks its format.
"""

from __future__ import annotations

from pathlib import Path

from clm.data import colmap_binary, colmap_text
from clm.data.colmap_model import (
    CAMERA_MODELS,
    MODEL_IDS,
    ColmapCamera,
    ColmapImage,
    ColmapModel,
    ColmapPoints,
    check_camera,
    qvec_to_rotmat,
    rotmat_to_qvec,
)
from clm.errors import ClmError

__all__ = [
    "CAMERA_MODELS",
    "MODEL_IDS",
    "ColmapCamera",
    "ColmapImage",
    "ColmapModel",
    "ColmapPoints",
    "find_sparse_dir",
    "qvec_to_rotmat",
    "read_model",
    "rotmat_to_qvec",
    "write_model",
]

_NAMES = ("cameras", "images", "points3D")


def find_sparse_dir(scene_root: Path) -> Path:
    """The folder holding the scene's sparse model: ``sparse/0`` if it has one, else ``sparse``."""
    for candidate in (scene_root / "sparse" / "0", scene_root / "sparse"):
        if _model_format(candidate) is not None:
            return candidate
    raise ClmError(
        f"{scene_root}: no COLMAP model found (expected cameras, images and points3D "
        f"as .bin or .txt in sparse/0/ or sparse/)"
    )


def read_model(sparse_dir: Path) -> ColmapModel:
    """Read a sparse model, binary if all three .bin files are there, else text."""
    fmt = _model_format(sparse_dir)
    if fmt is None:
        raise ClmError(
            f"{sparse_dir}: no complete COLMAP model (need cameras, images and points3D, "
            f"all .bin or all .txt)"
        )
    if fmt == ".bin":
        return ColmapModel(
            cameras=colmap_binary.read_cameras(sparse_dir / "cameras.bin"),
            images=colmap_binary.read_images(sparse_dir / "images.bin"),
            points=colmap_binary.read_points(sparse_dir / "points3D.bin"),
        )
    return ColmapModel(
        cameras=colmap_text.read_cameras(sparse_dir / "cameras.txt"),
        images=colmap_text.read_images(sparse_dir / "images.txt"),
        points=colmap_text.read_points(sparse_dir / "points3D.txt"),
    )


def write_model(sparse_dir: Path, model: ColmapModel, binary: bool = True) -> None:
    """Write a sparse model in COLMAP's binary (default) or text format, creating the folder."""
    sparse_dir.mkdir(parents=True, exist_ok=True)
    for camera in model.cameras.values():
        check_camera(sparse_dir / "cameras", camera)
    if binary:
        (sparse_dir / "cameras.bin").write_bytes(colmap_binary.cameras_bytes(model.cameras))
        (sparse_dir / "images.bin").write_bytes(colmap_binary.images_bytes(model.images))
        (sparse_dir / "points3D.bin").write_bytes(colmap_binary.points_bytes(model.points))
    else:
        (sparse_dir / "cameras.txt").write_text(colmap_text.cameras_text(model.cameras))
        (sparse_dir / "images.txt").write_text(colmap_text.images_text(model.images))
        (sparse_dir / "points3D.txt").write_text(colmap_text.points_text(model.points))


def _model_format(folder: Path) -> str | None:
    for ext in (".bin", ".txt"):
        if all((folder / f"{name}{ext}").is_file() for name in _NAMES):
            return ext
    return None
