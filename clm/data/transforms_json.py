"""Scenes described by NeRF-style ``transforms*.json`` files: NeRF-synthetic and nerfstudio.

Both store camera-to-world matrices in the OpenGL convention (x right, y up, z backwards);
frames come out with OpenCV world-to-camera matrices, still in the file's world frame.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from plyfile import PlyData

from clm.data.images import locate_image, read_image_size
from clm.data.types import Frame
from clm.data.undistort import pinhole_for_training
from clm.errors import ClmError

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".exr"}
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
# nerfstudio camera_model values that are a pinhole camera once k1, k2, p1, p2 are removed.
_NERFSTUDIO_MODELS = {"OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "PERSPECTIVE"}


def read_blender(root: Path, data_factor: int) -> tuple[list[Frame], list[Frame]]:
    """(train, test) frames of a NeRF-synthetic scene, in its world frame.

    ``transforms_test.json`` is optional. ``file_path`` names a PNG without its extension;
    images may be RGBA, and are composited at decode time.
    """
    train = _read_blender_split(root / "transforms_train.json", data_factor)
    test_file = root / "transforms_test.json"
    test = _read_blender_split(test_file, data_factor) if test_file.is_file() else []
    return train, test


def read_nerfstudio(
    root: Path, data_factor: int
) -> tuple[list[Frame], np.ndarray | None, np.ndarray | None]:
    """(frames, points float64 [P, 3], colours uint8 [P, 3]) of a nerfstudio scene.

    Points are None without ``ply_file_path``. Intrinsics come from the top level, each
    overridable per frame; an OPENCV camera with non-zero k1, k2, p1, p2 is undistorted. An
    instant-ngp file (``camera_angle_x``, no ``fl_x``) is read the same way.
    """
    path = root / "transforms.json"
    meta = _load_json(path)
    frames = []
    cameras: dict[tuple, int] = {}
    for index, entry in enumerate(_frame_list(path, meta)):
        where = f"{path}: frame {index}"
        settings = {**meta, **entry}
        model = str(settings.get("camera_model", "OPENCV")).upper()
        if model not in _NERFSTUDIO_MODELS:
            raise ClmError(
                f"{where}: camera_model {model} is not supported (only OPENCV and PINHOLE); "
                f"undistort the images first, e.g. with `colmap image_undistorter`"
            )
        for key in ("k3", "k4"):
            if _number(settings, key, where, 0.0) != 0.0:
                raise ClmError(f"{where}: radial term {key} is not supported (only k1, k2, p1, p2)")
        name = _image_name(_string(entry, "file_path", where))
        image_path = root / name
        if "w" in settings and "h" in settings:
            size = (int(_number(settings, "w", where)), int(_number(settings, "h", where)))
            if min(size) < 1:
                raise ClmError(f"{where}: image size w={size[0]}, h={size[1]} is not positive")
        else:  # the intrinsics then describe the full-resolution file
            size = read_image_size(image_path)
        path_found, decoded, resize_from = locate_image(
            image_path.parent, image_path.name, data_factor, size
        )
        width, height = size
        fx, fy = _focal_lengths(settings, where, width, height)
        cx = _number(settings, "cx", where, width / 2)
        cy = _number(settings, "cy", where, height / 2)
        sx, sy = decoded[0] / width, decoded[1] / height
        coefficients = tuple(_number(settings, key, where, 0.0) for key in ("k1", "k2", "p1", "p2"))
        k, out_w, out_h, distortion = pinhole_for_training(
            "OPENCV",
            (fx * sx, fy * sy, cx * sx, cy * sy),
            coefficients,
            decoded[0],
            decoded[1],
            where,
        )
        camera_key = (fx, fy, cx, cy, width, height, coefficients)
        frames.append(
            Frame(
                name=name,
                image_path=path_found,
                width=out_w,
                height=out_h,
                K=k,
                world_to_camera=_world_to_camera(entry, where),
                distortion=distortion,
                camera_id=cameras.setdefault(camera_key, len(cameras)),
                resize_from=resize_from,
            )
        )
    points = colors = None
    if "ply_file_path" in meta:
        points, colors = _read_ply(root / _string(meta, "ply_file_path", str(path)))
    return frames, points, colors


def _focal_lengths(
    settings: dict[str, Any], where: str, width: int, height: int
) -> tuple[float, float]:
    """``fl_x``/``fl_y``, or from ``camera_angle_x``/``_y`` as instant-ngp's files give them."""
    if "fl_x" in settings or "camera_angle_x" not in settings:
        fx = _number(settings, "fl_x", where)
    else:
        fx = _from_angle(settings, "camera_angle_x", where, width)
    if "fl_y" in settings:
        return fx, _number(settings, "fl_y", where)
    if "camera_angle_y" in settings:
        return fx, _from_angle(settings, "camera_angle_y", where, height)
    return fx, fx


def _from_angle(settings: dict[str, Any], key: str, where: str, pixels: int) -> float:
    angle = _number(settings, key, where)
    if not 0.0 < angle < math.pi:
        raise ClmError(f"{where}: {key} {angle} is not an angle in (0, pi) radians")
    return 0.5 * pixels / math.tan(0.5 * angle)


def _image_name(file_path: str) -> str:
    """The image's relative path; NeRF-synthetic style names without a suffix are PNGs."""
    name = PurePosixPath(file_path).as_posix()
    return name if PurePosixPath(name).suffix.lower() in _IMAGE_SUFFIXES else name + ".png"


def _read_blender_split(path: Path, data_factor: int) -> list[Frame]:
    meta = _load_json(path)
    angle_x = _number(meta, "camera_angle_x", str(path))
    if not 0.0 < angle_x < math.pi:
        raise ClmError(f"{path}: camera_angle_x {angle_x} is not an angle in (0, pi) radians")
    frames = []
    for index, entry in enumerate(_frame_list(path, meta)):
        where = f"{path}: frame {index}"
        name = _image_name(_string(entry, "file_path", where))
        image_path = path.parent / name
        path_found, decoded, resize_from = locate_image(
            image_path.parent, image_path.name, data_factor, None
        )
        width, height = resize_from or decoded
        fx = 0.5 * width / math.tan(0.5 * angle_x)
        fy = fx
        if "camera_angle_y" in meta:
            fy = _from_angle(meta, "camera_angle_y", str(path), height)
        sx, sy = decoded[0] / width, decoded[1] / height
        k = np.array(
            [[fx * sx, 0.0, decoded[0] / 2], [0.0, fy * sy, decoded[1] / 2], [0.0, 0.0, 1.0]]
        )
        frames.append(
            Frame(
                name=name,
                image_path=path_found,
                width=decoded[0],
                height=decoded[1],
                K=k,
                world_to_camera=_world_to_camera(entry, where),
                resize_from=resize_from,
            )
        )
    return frames


def _world_to_camera(entry: dict[str, Any], where: str) -> np.ndarray:
    """OpenCV world-to-camera from an OpenGL camera-to-world ``transform_matrix``."""
    try:
        matrix = np.array(entry["transform_matrix"], dtype=np.float64)
    except KeyError:
        raise ClmError(f"{where}: no transform_matrix") from None
    except (TypeError, ValueError):
        raise ClmError(f"{where}: transform_matrix is not a matrix of numbers") from None
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ClmError(f"{where}: transform_matrix must be a finite 4x4 (or 3x4) matrix")
    rot = matrix[:3, :3]
    rigid = np.allclose(rot.T @ rot, np.eye(3), atol=1e-3) and np.linalg.det(rot) > 0
    if not rigid or not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ClmError(f"{where}: transform_matrix is not a rotation plus translation")
    cam_to_world = matrix @ _GL_TO_CV
    out = np.eye(4)
    out[:3, :3] = cam_to_world[:3, :3].T
    out[:3, 3] = -cam_to_world[:3, :3].T @ cam_to_world[:3, 3]
    return out


def _read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertex positions and colours (grey where the file has none) of a point cloud."""
    try:
        vertices = PlyData.read(str(path))["vertex"]
        xyz = np.stack([np.asarray(vertices[c], dtype=np.float64) for c in "xyz"], axis=1)
    except FileNotFoundError:
        raise ClmError(f"{path}: point cloud not found") from None
    except Exception as exc:  # plyfile raises several types for malformed files
        raise ClmError(f"{path}: not a PLY point cloud with x, y, z vertices ({exc})") from exc
    names = vertices.data.dtype.names or ()
    if all(c in names for c in ("red", "green", "blue")):
        colors = np.stack([np.asarray(vertices[c]) for c in ("red", "green", "blue")], axis=1)
        colors = colors.astype(np.uint8)
    else:
        colors = np.full((len(xyz), 3), 128, dtype=np.uint8)
    return xyz, colors


def _load_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClmError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ClmError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ClmError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(meta, dict):
        raise ClmError(f"{path}: expected a JSON object at the top level")
    return meta


def _frame_list(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise ClmError(f"{path}: no 'frames' list, or it is empty")
    for index, entry in enumerate(frames):
        if not isinstance(entry, dict):
            raise ClmError(f"{path}: frame {index} is not a JSON object")
    return frames


def _number(settings: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = settings.get(key, default)
    if value is None:
        raise ClmError(f"{where}: missing {key!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ClmError(f"{where}: {key!r} is {value!r}, not a number")
    return float(value)


def _string(settings: dict[str, Any], key: str, where: str) -> str:
    value = settings.get(key)
    if not isinstance(value, str) or not value:
        raise ClmError(f"{where}: missing {key!r} (a relative path)")
    return value
