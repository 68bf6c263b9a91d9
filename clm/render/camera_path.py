"""Camera paths for videos, made from the training cameras: an orbit around the point they look
at, and a smooth path through the cameras themselves.

Poses are world-to-camera matrices ``[4, 4]`` with OpenCV axes (x right, y down, z forward), as
everywhere in clm. This module is numpy only: it knows cameras, not scenes or renderers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clm.errors import ClmError

_TINY = 1e-9


@dataclass(frozen=True)
class PathCamera:
    """One frame of a path: its pose, intrinsics ``K [3, 3]`` (pixels) and image size."""

    world_to_camera: np.ndarray
    K: np.ndarray
    width: int
    height: int


def camera_center(world_to_camera: np.ndarray) -> np.ndarray:
    rot, trans = world_to_camera[:3, :3], world_to_camera[:3, 3]
    return -rot.T @ trans


def scene_up(poses: Sequence[np.ndarray]) -> np.ndarray:
    """The world's up as the cameras see it, a unit vector.

    Cameras that look down at what they circle have their up axes (-y) tilted towards it, so
    the plain mean of those tilts the whole orbit when the views are not spread all round.
    Their x axes, though, stay level as long as the cameras do not roll: up is then the one
    direction perpendicular to all of them (signed like the mean up). When the x axes are
    (nearly) all parallel that direction is not determined, and the mean up is used.
    """
    ups = np.stack([-p[1, :3] for p in poses])
    mean = ups.mean(axis=0)
    norm = np.linalg.norm(mean)
    mean = mean / norm if norm > _TINY else ups[0] / np.linalg.norm(ups[0])
    rights = np.stack([p[0, :3] for p in poses])
    values, vectors = np.linalg.eigh(rights.T @ rights / len(poses))  # ascending
    if values[1] <= 4.0 * values[0] + 1e-9:
        return mean
    up = vectors[:, 0]
    return up if up @ mean >= 0 else -up


def look_at(position: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The pose at ``position`` looking at ``target``, with image-up as close to ``up`` as the
    view allows (any roll when looking straight along ``up``)."""
    forward = np.asarray(target, dtype=np.float64) - position
    distance = np.linalg.norm(forward)
    if distance <= _TINY:
        raise ClmError(f"a camera at {np.round(position, 6).tolist()} looks at itself")
    z = forward / distance
    x = np.cross(-np.asarray(up, dtype=np.float64), z)  # right = down x forward
    if np.linalg.norm(x) < 1e-6:
        x = np.cross(_perpendicular(z), z)
    x /= np.linalg.norm(x)
    rot = np.stack([x, np.cross(z, x), z])
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = -rot @ position
    return pose


def _perpendicular(v: np.ndarray) -> np.ndarray:
    """A unit vector perpendicular to unit ``v``."""
    axis = np.eye(3)[int(np.argmin(np.abs(v)))]
    w = axis - (axis @ v) * v
    return w / np.linalg.norm(w)


def focus_point(poses: Sequence[np.ndarray]) -> np.ndarray:
    """The point nearest (least squares) to all optical axes: what the cameras look at.

    When the axes do not meet in front of most cameras (near-parallel views), the point one
    camera-spread ahead of the mean camera along the mean viewing direction instead.
    """
    centers = np.stack([camera_center(p) for p in poses])
    forwards = np.stack([p[2, :3] for p in poses])
    projectors = np.eye(3) - forwards[:, :, None] * forwards[:, None, :]
    a = projectors.sum(axis=0)
    if np.linalg.cond(a) < 1e6:
        point = np.linalg.solve(a, np.einsum("nij,nj->i", projectors, centers))
        if (np.einsum("ni,ni->n", point - centers, forwards) > 0).mean() > 0.5:
            return point
    mean = centers.mean(axis=0)
    spread = float(np.max(np.linalg.norm(centers - mean, axis=1)))
    direction = forwards.mean(axis=0)
    norm = np.linalg.norm(direction)
    direction = direction / norm if norm > _TINY else forwards[0]
    return mean + direction * (spread if spread > _TINY else 1.0)


def orbit(poses: Sequence[np.ndarray], frames: int) -> list[np.ndarray]:
    """``frames`` poses evenly spaced on a circle about the cameras' up axis (:func:`scene_up`)
    through their focus point, at their median height above it and median distance from the
    axis, starting at the first camera's bearing and looking at the focus point. The last
    frame stops one step short of the first, so the video loops."""
    if not poses:
        raise ClmError("an orbit needs at least one training camera")
    up = scene_up(poses)
    focus = focus_point(poses)
    offsets = np.stack([camera_center(p) for p in poses]) - focus
    heights = offsets @ up
    flat = offsets - heights[:, None] * up
    radius = float(np.median(np.linalg.norm(flat, axis=1)))
    height = float(np.median(heights))
    length = np.linalg.norm(flat[0])
    e1 = flat[0] / length if length > _TINY else _perpendicular(up)
    e2 = np.cross(up, e1)
    out = []
    for k in range(frames):
        angle = 2.0 * math.pi * k / frames
        position = focus + height * up + radius * (math.cos(angle) * e1 + math.sin(angle) * e2)
        out.append(look_at(position, focus, up))
    return out


def order_along_path(poses: Sequence[np.ndarray]) -> list[int]:
    """Indices of ``poses`` in a walk from the camera farthest from their mean, each step to the
    nearest camera not yet visited: a path without long jumps back and forth."""
    centers = np.stack([camera_center(p) for p in poses])
    current = int(np.argmax(np.linalg.norm(centers - centers.mean(axis=0), axis=1)))
    order = [current]
    visited = np.zeros(len(poses), dtype=bool)
    visited[current] = True
    for _ in range(len(poses) - 1):
        distances = np.linalg.norm(centers - centers[current], axis=1)
        distances[visited] = np.inf
        current = int(np.argmin(distances))
        visited[current] = True
        order.append(current)
    return order


class PoseSpline:
    """A smooth camera path through ``poses`` in the order given.

    Positions follow a chordal Catmull-Rom spline (knots spaced by the distance between
    cameras, so sampling the parameter evenly moves at a nearly even speed); rotations are
    slerped between neighbouring cameras. The path passes exactly through every pose at its
    knot, ``knots[i]``.
    """

    def __init__(self, poses: Sequence[np.ndarray]) -> None:
        if len(poses) < 2:
            raise ClmError(f"a path through the cameras needs at least 2, got {len(poses)}")
        self._positions = np.stack([camera_center(p) for p in poses])
        quats = [rotation_to_quat(p[:3, :3]) for p in poses]
        for i in range(1, len(quats)):  # the shorter way round from each to the next
            if quats[i] @ quats[i - 1] < 0:
                quats[i] = -quats[i]
        self._quats = np.stack(quats)
        chords = np.linalg.norm(np.diff(self._positions, axis=0), axis=1)
        mean = chords.mean()
        # Cameras at the same place still get a little time to turn.
        steps = np.maximum(chords, 1e-3 * mean) if mean > _TINY else np.ones_like(chords)
        self.knots = np.concatenate([[0.0], np.cumsum(steps)])

    def __call__(self, t: float) -> np.ndarray:
        """The pose at parameter ``t`` in ``[knots[0], knots[-1]]``."""
        knots, p = self.knots, self._positions
        i = int(np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(knots) - 2))
        # Mirror the end cameras to get the neighbours the first and last segments need.
        t0 = knots[i - 1] if i > 0 else 2 * knots[0] - knots[1]
        p0 = p[i - 1] if i > 0 else 2 * p[0] - p[1]
        t3 = knots[i + 2] if i + 2 < len(knots) else 2 * knots[-1] - knots[-2]
        p3 = p[i + 2] if i + 2 < len(knots) else 2 * p[-1] - p[-2]
        position = _catmull_rom((t0, knots[i], knots[i + 1], t3), (p0, p[i], p[i + 1], p3), t)
        u = (t - knots[i]) / (knots[i + 1] - knots[i])
        rot = quat_to_rotation(slerp(self._quats[i], self._quats[i + 1], float(u)))
        pose = np.eye(4)
        pose[:3, :3] = rot
        pose[:3, 3] = -rot @ position
        return pose


def _catmull_rom(
    times: tuple[float, float, float, float], points: tuple[np.ndarray, ...], t: float
) -> np.ndarray:
    """Barry and Goldman's pyramid: the segment between points 1 and 2 at time ``t``."""
    t0, t1, t2, t3 = times
    p0, p1, p2, p3 = points

    def lerp(a: np.ndarray, b: np.ndarray, ta: float, tb: float) -> np.ndarray:
        return ((tb - t) * a + (t - ta) * b) / (tb - ta)

    a1, a2, a3 = lerp(p0, p1, t0, t1), lerp(p1, p2, t1, t2), lerp(p2, p3, t2, t3)
    return lerp(lerp(a1, a2, t0, t2), lerp(a2, a3, t1, t3), t1, t2)


def interpolate(poses: Sequence[np.ndarray], frames: int) -> list[np.ndarray]:
    """``frames`` poses along a :class:`PoseSpline` through ``poses``, ordered by
    :func:`order_along_path`, from one end camera to the other."""
    if len(poses) < 2:
        raise ClmError(
            f"--path interp needs at least 2 training cameras, the scene has {len(poses)}"
        )
    spline = PoseSpline([poses[i] for i in order_along_path(poses)])
    return [spline(float(t)) for t in np.linspace(spline.knots[0], spline.knots[-1], frames)]


def rotation_to_quat(rot: np.ndarray) -> np.ndarray:
    """Unit quaternion ``(w, x, y, z)`` of a rotation matrix (largest-component method)."""
    m = rot
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    quat = np.asarray(q)
    return quat / np.linalg.norm(quat)


def quat_to_rotation(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a quaternion ``(w, x, y, z)`` (normalised here)."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def slerp(q0: np.ndarray, q1: np.ndarray, u: float) -> np.ndarray:
    """Constant-speed rotation from ``q0`` (u = 0) to ``q1`` (u = 1) along their great arc."""
    dot = float(np.clip(q0 @ q1, -1.0, 1.0))
    if dot > 0.9995:  # nearly equal: the chord is the arc
        q = q0 + u * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = math.acos(dot)
    return (math.sin((1 - u) * theta) * q0 + math.sin(u * theta) * q1) / math.sin(theta)


def output_size(
    width: int, height: int, new_width: int | None, new_height: int | None
) -> tuple[int, int]:
    """The requested image size; a missing side follows the other at the original aspect."""
    if new_width is None and new_height is None:
        return width, height
    if new_height is None:
        return new_width, max(1, round(new_width * height / width))
    if new_width is None:
        return max(1, round(new_height * width / height)), new_height
    return new_width, new_height


def scale_intrinsics(
    K: np.ndarray, width: int, height: int, new_width: int, new_height: int
) -> np.ndarray:
    """``K`` for the same camera rendering ``new_width x new_height``: the vertical field of view
    and the pixels' shape are kept (both focals scale with the height), the principal point keeps
    its place relative to the image; a new aspect widens or narrows the horizontal view."""
    out = np.array(K, dtype=np.float64, copy=True)
    s = new_height / height
    out[0, 0] *= s
    out[1, 1] *= s
    out[0, 2] *= new_width / width
    out[1, 2] *= s
    return out
