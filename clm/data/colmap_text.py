"""COLMAP's text model files (cameras.txt, images.txt, points3D.txt), read strictly: a bad line
is a ClmError naming the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import numpy as np

from clm.data.colmap_model import (
    ColmapCamera,
    ColmapImage,
    ColmapPoints,
    check_camera,
)
from clm.errors import ClmError


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every line; comments are left to the callers."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ClmError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]


def _is_skipped(line: str) -> bool:
    return not line or line.startswith("#")


def _numbers(path: Path, number: int, fields: list[str], kind: type) -> list:
    try:
        return [kind(value) for value in fields]
    except ValueError:
        bad = next(value for value in fields if not _parses(value, kind))
        raise ClmError(f"{path}: line {number}: {bad!r} is not a number") from None


def _parses(value: str, kind: type) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True


def read_cameras(path: Path) -> dict[int, ColmapCamera]:
    cameras: dict[int, ColmapCamera] = {}
    for number, line in _data_lines(path):
        if _is_skipped(line):
            continue
        fields = line.split()
        if len(fields) < 4:
            raise ClmError(f"{path}: line {number}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS")
        camera_id, width, height = _numbers(path, number, [fields[0], *fields[2:4]], int)
        params = np.array(_numbers(path, number, fields[4:], float), dtype=np.float64)
        camera = ColmapCamera(camera_id, fields[1], width, height, params)
        check_camera(path, camera)
        if camera_id in cameras:
            raise ClmError(f"{path}: line {number}: camera id {camera_id} appears twice")
        cameras[camera_id] = camera
    return cameras


def read_images(path: Path) -> dict[int, ColmapImage]:
    images: dict[int, ColmapImage] = {}
    lines = _data_lines(path)
    i = 0
    while i < len(lines):
        number, line = lines[i]
        i += 1
        if _is_skipped(line):
            continue
        fields = line.split(maxsplit=9)
        if len(fields) < 10:
            raise ClmError(
                f"{path}: line {number}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME"
            )
        image_id, camera_id = _numbers(path, number, [fields[0], fields[8]], int)
        pose = _numbers(path, number, fields[1:8], float)
        # The observations line always follows, even when it is empty.
        points_line = lines[i][1] if i < len(lines) else ""
        point_fields = points_line.split()
        i += 1
        if len(point_fields) % 3:
            raise ClmError(f"{path}: line {number + 1}: POINTS2D is not a list of X Y POINT3D_ID")
        values = _numbers(path, number + 1, point_fields, float)
        triples = np.array(values, dtype=np.float64).reshape(-1, 3)
        if not np.all(triples[:, 2] == np.round(triples[:, 2])):
            raise ClmError(f"{path}: line {number + 1}: a POINT3D_ID is not an integer")
        if image_id in images:
            raise ClmError(f"{path}: line {number}: image id {image_id} appears twice")
        images[image_id] = ColmapImage(
            id=image_id,
            qvec=np.array(pose[:4]),
            tvec=np.array(pose[4:]),
            camera_id=camera_id,
            name=fields[9],
            xys=triples[:, :2].copy(),
            point3d_ids=triples[:, 2].astype(np.int64),
        )
    return images


def read_points(path: Path) -> ColmapPoints:
    """Splits every line in Python but parses all numbers with numpy in one go (twice as fast
    for a million points); only on failure does it look for the offending line."""
    heads: list[str] = []
    tracks: list[str] = []
    lengths: list[int] = []
    numbered = [(number, line) for number, line in _data_lines(path) if not _is_skipped(line)]
    for number, line in numbered:
        fields = line.split()
        if len(fields) < 8 or (len(fields) - 8) % 2:
            raise ClmError(
                f"{path}: line {number}: expected POINT3D_ID X Y Z R G B ERROR "
                f"then (IMAGE_ID, POINT2D_IDX) pairs"
            )
        heads.extend(fields[:8])
        tracks.extend(fields[8:])
        lengths.append((len(fields) - 8) // 2)
    if not lengths:
        return ColmapPoints.empty()
    try:
        head = np.fromstring(" ".join(heads), sep=" ").reshape(-1, 8)
        pairs = np.fromstring(" ".join(tracks), sep=" ").reshape(-1, 2)
    except ValueError:
        _raise_bad_point_line(path, numbered)
    integral = np.concatenate([head[:, [0, 4, 5, 6]].ravel(), pairs.ravel()])
    if not np.array_equal(integral, np.round(integral)):
        _raise_bad_point_line(path, numbered)
    ids = head[:, 0].astype(np.int64)
    xyz = head[:, 1:4].copy()
    rgb = head[:, 4:7].astype(np.int64)
    errors = head[:, 7].copy()
    bad_colour = np.flatnonzero(np.any((rgb < 0) | (rgb > 255), axis=1))
    if len(bad_colour):
        number = numbered[bad_colour[0]][0]
        raise ClmError(
            f"{path}: line {number}: colour {rgb[bad_colour[0]].tolist()} is outside 0..255"
        )
    return ColmapPoints(
        ids=ids,
        xyz=xyz,
        rgb=rgb.astype(np.uint8),
        errors=errors,
        track_lengths=np.array(lengths, dtype=np.int64),
        track_image_ids=pairs[:, 0].astype(np.int32),
        track_point2d_idx=pairs[:, 1].astype(np.int32),
    )


def _raise_bad_point_line(path: Path, numbered: list[tuple[int, str]]) -> NoReturn:
    for number, line in numbered:
        fields = line.split()
        _numbers(path, number, fields[:1] + fields[4:7] + fields[8:], int)
        _numbers(path, number, fields[1:4] + fields[7:8], float)
    raise ClmError(f"{path}: holds a value that is not a number")


def cameras_text(cameras: dict[int, ColmapCamera]) -> str:
    lines = [
        "# Camera list with one line of data per camera:",
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
        f"# Number of cameras: {len(cameras)}",
    ]
    for camera in cameras.values():
        params = " ".join(repr(float(p)) for p in camera.params)
        lines.append(f"{camera.id} {camera.model} {camera.width} {camera.height} {params}")
    return "\n".join(lines) + "\n"


def images_text(images: dict[int, ColmapImage]) -> str:
    observations = sum(len(image.point3d_ids) for image in images.values())
    mean = observations / len(images) if images else 0.0
    lines = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
        f"# Number of images: {len(images)}, mean observations per image: {mean}",
    ]
    for image in images.values():
        pose = " ".join(repr(float(v)) for v in (*image.qvec, *image.tvec))
        lines.append(f"{image.id} {pose} {image.camera_id} {image.name}")
        xys = np.asarray(image.xys, dtype=np.float64).reshape(-1, 2)
        lines.append(
            " ".join(
                f"{x!r} {y!r} {pid}"
                for x, y, pid in zip(
                    xys[:, 0].tolist(), xys[:, 1].tolist(), image.point3d_ids.tolist(), strict=True
                )
            )
        )
    return "\n".join(lines) + "\n"


def points_text(points: ColmapPoints) -> str:
    n = len(points)
    mean = float(np.mean(points.track_lengths)) if n else 0.0
    lines = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
        f"# Number of points: {n}, mean track length: {mean}",
    ]
    ends = np.cumsum(np.asarray(points.track_lengths, dtype=np.int64)).tolist()
    image_ids, point2d_idx = points.track_image_ids.tolist(), points.track_point2d_idx.tolist()
    start = 0
    for i in range(n):
        x, y, z = points.xyz[i].tolist()
        r, g, b = points.rgb[i].tolist()
        head = f"{points.ids[i]} {x!r} {y!r} {z!r} {r} {g} {b} {float(points.errors[i])!r}"
        track = " ".join(f"{image_ids[k]} {point2d_idx[k]}" for k in range(start, ends[i]))
        lines.append(f"{head} {track}" if track else head)
        start = ends[i]
    return "\n".join(lines) + "\n"
