"""Camera poses from a JSON file, for ``clm-render --path FILE.json``.

clm's own layout is a list of cameras, bare or under ``"cameras"`` next to defaults for them::

    {"axes": "opencv", "width": 1280, "height": 720, "fov_deg": 50,
     "cameras": [{"c2w": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -4], [0, 0, 0, 1]]},
                 {"position": [4, 0, 1], "look_at": [0, 0, 0], "up": [0, 0, 1]},
                 {"c2w": [...], "fx": 900, "fy": 900, "cx": 640, "cy": 360}]}

A camera is placed by ``c2w`` (camera-to-world, 4x4 or 3x4, nested or flat row-major; OpenCV
axes, or OpenGL's y up, z backwards with ``"axes": "opengl"``) or by ``position`` and
``look_at`` (``up`` defaults to the training cameras' up). Its lens is ``fov_deg`` (the
vertical field of view) or ``fx`` (``fy`` defaults to it, ``cx``/``cy`` to the image centre) in
pixels; without either, the first training camera's, scaled to the image. ``width`` and
``height`` default to the file's, then to the first training camera's.

nerfstudio's ``camera_path.json`` is read too: ``camera_path`` entries with ``camera_to_world``
(16 floats, OpenGL axes) and ``fov`` (vertical, degrees), at ``render_width x render_height``.

Poses are in the scene's own frame: that of its COLMAP model or ``transforms.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from clm.errors import ClmError
from clm.render.camera_path import PathCamera, look_at, scale_intrinsics

_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def read_camera_file(
    path: Path, default_K: np.ndarray, default_size: tuple[int, int], up: np.ndarray
) -> list[PathCamera]:
    """The cameras of ``path``; ``default_K`` at ``default_size`` (width, height) and ``up`` fill
    in what an entry leaves out."""
    if not path.is_file():
        raise ClmError(f"{path}: camera path file not found")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClmError(f"{path}: not a JSON file ({exc})") from exc
    if isinstance(data, dict) and "camera_path" in data:
        return _nerfstudio(path, data, default_K, default_size)
    settings: dict[str, Any] = data if isinstance(data, dict) else {"cameras": data}
    entries = settings.get("cameras")
    if not isinstance(entries, list) or not entries:
        raise ClmError(f'{path}: expected a list of cameras, or one under "cameras"')
    axes = settings.get("axes", "opencv")
    if axes not in ("opencv", "opengl"):
        raise ClmError(f'{path}: "axes" is {axes!r}, expected "opencv" or "opengl"')
    cameras = []
    for i, entry in enumerate(entries):
        where = f"{path}: camera {i}"
        if not isinstance(entry, dict):
            raise ClmError(f"{where}: expected an object, got {type(entry).__name__}")
        merged = {k: settings[k] for k in ("width", "height", "fov_deg") if k in settings}
        merged.update(entry)
        cameras.append(_camera(merged, where, axes, default_K, default_size, up))
    return cameras


def _camera(
    entry: dict[str, Any],
    where: str,
    axes: str,
    default_K: np.ndarray,
    default_size: tuple[int, int],
    up: np.ndarray,
) -> PathCamera:
    width = _size(entry, "width", where, default_size[0])
    height = _size(entry, "height", where, default_size[1])
    if "c2w" in entry:
        c2w = _matrix(entry["c2w"], where)
        pose = _world_to_camera(c2w @ _GL_TO_CV if axes == "opengl" else c2w, where)
    elif "position" in entry and "look_at" in entry:
        pose = look_at(
            _vector(entry, "position", where),
            _vector(entry, "look_at", where),
            _vector(entry, "up", where) if "up" in entry else up,
        )
    else:
        raise ClmError(f'{where}: needs "c2w", or "position" and "look_at"')
    if "fov_deg" in entry:
        K = _from_fov(_number(entry, "fov_deg", where), width, height, where)
    elif "fx" in entry:
        fx = _number(entry, "fx", where)
        fy = _number(entry, "fy", where) if "fy" in entry else fx
        cx = _number(entry, "cx", where) if "cx" in entry else width / 2
        cy = _number(entry, "cy", where) if "cy" in entry else height / 2
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
    else:
        K = scale_intrinsics(default_K, *default_size, width, height)
    return PathCamera(pose, K, width, height)


def _nerfstudio(
    path: Path, data: dict[str, Any], default_K: np.ndarray, default_size: tuple[int, int]
) -> list[PathCamera]:
    entries = data["camera_path"]
    if not isinstance(entries, list) or not entries:
        raise ClmError(f'{path}: "camera_path" holds no cameras')
    kind = data.get("camera_type", "perspective")
    if kind != "perspective":
        raise ClmError(f"{path}: camera_type {kind!r}; only perspective cameras are rendered")
    width = _size(data, "render_width", str(path), default_size[0])
    height = _size(data, "render_height", str(path), default_size[1])
    cameras = []
    for i, entry in enumerate(entries):
        where = f"{path}: camera_path[{i}]"
        if not isinstance(entry, dict) or "camera_to_world" not in entry:
            raise ClmError(f'{where}: needs "camera_to_world"')
        pose = _world_to_camera(_matrix(entry["camera_to_world"], where) @ _GL_TO_CV, where)
        if "fov" in entry:
            K = _from_fov(_number(entry, "fov", where), width, height, where)
        else:
            K = scale_intrinsics(default_K, *default_size, width, height)
        cameras.append(PathCamera(pose, K, width, height))
    return cameras


def _matrix(value: Any, where: str) -> np.ndarray:
    """A 4x4 camera-to-world matrix from 4x4 or 3x4 values, nested or flat (row-major)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ClmError(f"{where}: the camera-to-world matrix is not numbers") from exc
    if array.size not in (12, 16) or not np.all(np.isfinite(array)):
        raise ClmError(f"{where}: expected a 4x4 or 3x4 camera-to-world matrix of finite numbers")
    out = np.eye(4)
    out[: array.size // 4] = array.reshape(-1, 4)
    return out


def _world_to_camera(c2w: np.ndarray, where: str) -> np.ndarray:
    rot = c2w[:3, :3]
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-4) or np.linalg.det(rot) < 0:
        raise ClmError(f"{where}: the camera-to-world rotation is not a rotation")
    pose = np.eye(4)
    pose[:3, :3] = rot.T
    pose[:3, 3] = -rot.T @ c2w[:3, 3]
    return pose


def _from_fov(degrees: float, width: int, height: int, where: str) -> np.ndarray:
    if not 0 < degrees < 180:
        raise ClmError(f"{where}: field of view {degrees} is not in (0, 180) degrees")
    focal = 0.5 * height / math.tan(math.radians(degrees) / 2)
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)


def _number(entry: dict[str, Any], key: str, where: str) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ClmError(f"{where}: {key} is {value!r}, expected a number")
    return float(value)


def _size(entry: dict[str, Any], key: str, where: str, default: int) -> int:
    if key not in entry:
        return default
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClmError(f"{where}: {key} is {value!r}, expected a positive whole number of pixels")
    return value


def _vector(entry: dict[str, Any], key: str, where: str) -> np.ndarray:
    try:
        vector = np.asarray(entry[key], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ClmError(f"{where}: {key} is not 3 numbers") from exc
    if vector.shape != (3,) or not np.all(np.isfinite(vector)):
        raise ClmError(f"{where}: {key} is not 3 finite numbers")
    return vector
