"""Remove radial-tangential lens distortion so the rasterizer's pinhole model holds.

Supported: COLMAP's SIMPLE_RADIAL (k1), RADIAL (k1, k2) and OPENCV (k1, k2, p1, p2), which
all are the OpenCV model with some coefficients zero. The undistorted image keeps the
distorted camera's focal lengths and is cropped to the largest axis-aligned rectangle whose
every pixel samples inside the distorted image (OpenCV's alpha=0), so no black borders are
trained on. Pixel coordinates use COLMAP's convention: the first pixel's centre is at 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from clm.data.types import Distortion
from clm.errors import ClmError

# Supported model -> number of distortion coefficients after its pinhole parameters.
SUPPORTED_MODELS = {"SIMPLE_RADIAL": 1, "RADIAL": 2, "OPENCV": 4}

_NEWTON_STEPS = 50
_TOLERANCE = 1e-10
_ROWS_PER_BLOCK = 128


def split_camera_params(
    model: str, params: Sequence[float], camera: str
) -> tuple[tuple[float, float, float, float], tuple[float, ...]]:
    """((fx, fy, cx, cy), distortion coefficients) of a COLMAP camera model.

    ``camera`` names the camera in the error raised for a model that cannot be trained, e.g.
    ``"sparse/0/cameras.bin: camera 3"``.
    """
    p = [float(v) for v in params]
    if model == "SIMPLE_PINHOLE":
        return (p[0], p[0], p[1], p[2]), ()
    if model == "PINHOLE":
        return (p[0], p[1], p[2], p[3]), ()
    if model in ("SIMPLE_RADIAL", "RADIAL"):
        return (p[0], p[0], p[1], p[2]), tuple(p[3:])
    if model == "OPENCV":
        return (p[0], p[1], p[2], p[3]), tuple(p[4:])
    raise ClmError(
        f"{camera}: camera model {model} is not supported (only SIMPLE_PINHOLE, PINHOLE, "
        f"SIMPLE_RADIAL, RADIAL, OPENCV); run `colmap image_undistorter` and train on its output"
    )


def pinhole_for_training(
    model: str,
    intrinsics: tuple[float, float, float, float],
    coefficients: Sequence[float],
    width: int,
    height: int,
    camera: str,
) -> tuple[np.ndarray, int, int, Distortion | None]:
    """(K, width, height) that is trained, and the Distortion to remove when decoding.

    ``intrinsics`` (fx, fy, cx, cy) must already describe the image at ``width`` x ``height``
    (after any data factor): distortion coefficients act on normalised coordinates, so they
    do not change with the resolution. All-zero coefficients need no undistortion. Focal
    lengths that are not positive, or any value that is not finite, are a ClmError.
    """
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    if not (math.isfinite(cx) and math.isfinite(cy) and 0 < fx < math.inf and 0 < fy < math.inf):
        raise ClmError(
            f"{camera}: intrinsics fx={fx:g}, fy={fy:g}, cx={cx:g}, cy={cy:g} are unusable "
            f"(focal lengths must be positive, all values finite)"
        )
    if not any(coefficients):
        return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), width, height, None
    distortion = Distortion(
        model, tuple(float(c) for c in coefficients), fx, fy, cx, cy, width, height
    )
    try:
        k, out_w, out_h = undistorted_camera(distortion)
    except ClmError as exc:
        raise ClmError(f"{camera}: {exc}") from exc
    return k, out_w, out_h, distortion


def undistorted_camera(distortion: Distortion) -> tuple[np.ndarray, int, int]:
    """(K, width, height) of the pinhole image that :func:`undistort_image` produces."""
    k, width, height = _undistorted_camera(distortion)
    return k.copy(), width, height


def undistort_image(image: np.ndarray, distortion: Distortion) -> np.ndarray:
    """Resample a distorted uint8 [H, W, C] image into the pinhole camera of
    :func:`undistorted_camera`, by inverse mapping with bilinear interpolation."""
    if image.shape[:2] != (distortion.height, distortion.width):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]}, the distortion describes "
            f"{distortion.width}x{distortion.height}"
        )
    grid = _sampling_grid(distortion)
    pixels = np.require(image, requirements=["C", "W"])  # torch wants writable arrays
    source = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def distort_normalized(distortion: Distortion, xy: np.ndarray) -> np.ndarray:
    """Apply the lens model to normalised image coordinates [..., 2] (z = 1 plane)."""
    k1, k2, p1, p2 = _coefficients(distortion)
    x, y = xy[..., 0], xy[..., 1]
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + k2 * r2)
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + 2.0 * p2 * x * y + p1 * (r2 + 2.0 * y * y)
    return np.stack([xd, yd], axis=-1)


def undistort_normalized(distortion: Distortion, xy_distorted: np.ndarray) -> np.ndarray:
    """Invert :func:`distort_normalized` by Newton's method on the nearest branch.

    Raises ClmError where it does not converge or lands where the lens model folds back on
    itself (Jacobian not positive): the distortion is too strong for that part of the image.
    """
    k1, k2, p1, p2 = _coefficients(distortion)
    target = np.asarray(xy_distorted, dtype=np.float64)
    xy = target.copy()
    with np.errstate(all="ignore"):  # diverging points end as inf/nan and are caught below
        for _ in range(_NEWTON_STEPS):
            residual = distort_normalized(distortion, xy) - target
            jac = _jacobian(xy, k1, k2, p1, p2)
            det = jac[..., 0, 0] * jac[..., 1, 1] - jac[..., 0, 1] * jac[..., 1, 0]
            safe = np.where(np.abs(det) < 1e-12, 1e-12, det)
            dx = (jac[..., 1, 1] * residual[..., 0] - jac[..., 0, 1] * residual[..., 1]) / safe
            dy = (jac[..., 0, 0] * residual[..., 1] - jac[..., 1, 0] * residual[..., 0]) / safe
            xy[..., 0] -= dx
            xy[..., 1] -= dy
            if not np.max(np.abs(residual), initial=0.0) >= _TOLERANCE:
                break
        residual = np.abs(distort_normalized(distortion, xy) - target)
        jac = _jacobian(xy, k1, k2, p1, p2)
        det = jac[..., 0, 0] * jac[..., 1, 1] - jac[..., 0, 1] * jac[..., 1, 0]
    if not (np.all(residual < 1e-8) and np.all(det > 0)):
        raise ClmError(
            f"{distortion.model} distortion {distortion.params} cannot be inverted across the "
            f"image (too strong); run `colmap image_undistorter` and train on its output"
        )
    return xy


def _coefficients(distortion: Distortion) -> tuple[float, float, float, float]:
    """(k1, k2, p1, p2), with zeros for those the model lacks."""
    count = SUPPORTED_MODELS.get(distortion.model)
    if count is None or len(distortion.params) != count:
        raise ValueError(f"not an undistortable model: {distortion.model} {distortion.params}")
    k1, k2, p1, p2 = (*distortion.params, 0.0, 0.0, 0.0)[:4]
    return float(k1), float(k2), float(p1), float(p2)


def _jacobian(xy: np.ndarray, k1: float, k2: float, p1: float, p2: float) -> np.ndarray:
    x, y = xy[..., 0], xy[..., 1]
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + k2 * r2)
    dradial = 2.0 * (k1 + 2.0 * k2 * r2)  # d(radial)/dx = dradial * x, likewise for y
    jac = np.empty((*xy.shape[:-1], 2, 2))
    jac[..., 0, 0] = radial + dradial * x * x + 2.0 * p1 * y + 6.0 * p2 * x
    jac[..., 0, 1] = dradial * x * y + 2.0 * p1 * x + 2.0 * p2 * y
    jac[..., 1, 0] = dradial * x * y + 2.0 * p2 * y + 2.0 * p1 * x
    jac[..., 1, 1] = radial + dradial * y * y + 2.0 * p2 * x + 6.0 * p1 * y
    return jac


@lru_cache(maxsize=64)
def _undistorted_camera(distortion: Distortion) -> tuple[np.ndarray, int, int]:
    d = distortion
    w, h = d.width, d.height
    # Points along the four edges of the distorted image's pixel centres: every half pixel
    # plus the principal point's row/column, where a purely radial lens bends an edge most.
    xs = np.append(np.linspace(0.5, w - 0.5, 2 * w - 1), np.clip(d.cx, 0.5, w - 0.5))
    ys = np.append(np.linspace(0.5, h - 0.5, 2 * h - 1), np.clip(d.cy, 0.5, h - 0.5))
    edges = {
        "left": np.stack([np.full_like(ys, 0.5), ys], axis=1),
        "right": np.stack([np.full_like(ys, w - 0.5), ys], axis=1),
        "top": np.stack([xs, np.full_like(xs, 0.5)], axis=1),
        "bottom": np.stack([xs, np.full_like(xs, h - 0.5)], axis=1),
    }
    inner = {}
    for side, pixels in edges.items():
        normalised = (pixels - [d.cx, d.cy]) / [d.fx, d.fy]
        inner[side] = undistort_normalized(d, normalised)
    x_min = inner["left"][:, 0].max()
    x_max = inner["right"][:, 0].min()
    y_min = inner["top"][:, 1].max()
    y_max = inner["bottom"][:, 1].min()
    out_w = int(np.floor(d.fx * (x_max - x_min) + 1e-9)) + 1
    out_h = int(np.floor(d.fy * (y_max - y_min) + 1e-9)) + 1
    if x_max <= x_min or y_max <= y_min:
        raise ClmError(
            f"{d.model} distortion {d.params} leaves no undistorted image; "
            f"run `colmap image_undistorter` and train on its output"
        )
    # The first pixel centre (0.5) looks exactly along (x_min, y_min).
    k = np.array(
        [[d.fx, 0.0, 0.5 - d.fx * x_min], [0.0, d.fy, 0.5 - d.fy * y_min], [0.0, 0.0, 1.0]]
    )
    return k, out_w, out_h


def _source_pixels(distortion: Distortion, rows: slice) -> np.ndarray:
    """Where, in the distorted image, some rows of undistorted pixel centres land: [r, w, 2]."""
    k, out_w, out_h = _undistorted_camera(distortion)
    xs = (np.arange(out_w) + 0.5 - k[0, 2]) / k[0, 0]
    ys = (np.arange(out_h)[rows] + 0.5 - k[1, 2]) / k[1, 1]
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)
    distorted = distort_normalized(distortion, grid)
    d = distortion
    return distorted * [d.fx, d.fy] + [d.cx, d.cy]


@lru_cache(maxsize=2)
def _sampling_grid(distortion: Distortion) -> torch.Tensor:
    """grid_sample's [1, h, w, 2] grid; with align_corners=False, -1 and 1 are the image's
    outer edges, which is exactly the pixel-edge convention. Built in float64 blocks of rows
    so a large image needs no full-size float64 temporaries."""
    _, out_w, out_h = _undistorted_camera(distortion)
    scale = np.array([2.0 / distortion.width, 2.0 / distortion.height])
    grid = np.empty((out_h, out_w, 2), dtype=np.float32)
    for start in range(0, out_h, _ROWS_PER_BLOCK):
        rows = slice(start, start + _ROWS_PER_BLOCK)
        grid[rows] = _source_pixels(distortion, rows) * scale - 1.0
    return torch.from_numpy(grid)[None]
