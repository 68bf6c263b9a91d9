"""COLMAP's binary model files (cameras.bin, images.bin, points3D.bin), read strictly: a short
or inconsistent file is a ClmError naming the file and the record."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from clm.data.colmap_model import (
    CAMERA_MODELS,
    MODEL_IDS,
    ColmapCamera,
    ColmapImage,
    ColmapPoints,
)
from clm.errors import ClmError

_CAMERA = struct.Struct("<iiQQ")
_IMAGE = struct.Struct("<i7di")
_U64 = struct.Struct("<Q")
_POINT2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("point3d_id", "<i8")])
_POINT3D = np.dtype(
    [
        ("id", "<u8"),
        ("xyz", "<f8", (3,)),
        ("rgb", "u1", (3,)),
        ("error", "<f8"),
        ("track_length", "<u8"),
    ]
)
_TRACK_LENGTH_AT = _POINT3D.fields["track_length"][1]


class _Reader:
    """A cursor over a whole file's bytes that turns every short read into a ClmError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def fail(self, message: str) -> ClmError:
        return ClmError(f"{self.path}: {message}")

    def unpack(self, fmt: struct.Struct, where: str) -> tuple:
        if self.pos + fmt.size > len(self.data):
            raise self.fail(f"truncated at {where}")
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def count(self, what: str, min_record: int) -> int:
        """The leading record count, refused when even minimal records could not fit."""
        (n,) = self.unpack(_U64, "the header")
        room = len(self.data) - self.pos
        if n * min_record > room:
            raise self.fail(f"header says {n} {what} but only {room} bytes follow")
        return n

    def array(self, dtype: np.dtype, n: int, where: str) -> np.ndarray:
        size = n * dtype.itemsize
        if self.pos + size > len(self.data):
            raise self.fail(f"truncated at {where}")
        out = np.frombuffer(self.data, dtype=dtype, count=n, offset=self.pos)
        self.pos += size
        return out

    def cstring(self, where: str) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self.fail(f"truncated at {where} (name has no terminating NUL)")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{where}: name is not valid UTF-8") from exc

    def finish(self, what: str) -> None:
        extra = len(self.data) - self.pos
        if extra:
            raise self.fail(f"{extra} unexpected bytes after the last {what}")


def read_cameras(path: Path) -> dict[int, ColmapCamera]:
    reader = _Reader(path)
    n = reader.count("cameras", _CAMERA.size)
    cameras: dict[int, ColmapCamera] = {}
    for i in range(n):
        where = f"camera {i + 1} of {n}"
        camera_id, model_id, width, height = reader.unpack(_CAMERA, where)
        if model_id not in CAMERA_MODELS:
            raise reader.fail(f"camera {camera_id} has unknown model id {model_id}")
        name, num_params = CAMERA_MODELS[model_id]
        params = reader.array(np.dtype("<f8"), num_params, where).astype(np.float64)
        if camera_id in cameras:
            raise reader.fail(f"camera id {camera_id} appears twice")
        cameras[camera_id] = ColmapCamera(camera_id, name, width, height, params)
    reader.finish("camera")
    return cameras


def read_images(path: Path) -> dict[int, ColmapImage]:
    reader = _Reader(path)
    # Smallest record: the fixed fields, a one-byte name and the point count.
    n = reader.count("images", _IMAGE.size + 1 + _U64.size)
    images: dict[int, ColmapImage] = {}
    for i in range(n):
        where = f"image {i + 1} of {n}"
        image_id, *pose, camera_id = reader.unpack(_IMAGE, where)
        name = reader.cstring(where)
        (num_points,) = reader.unpack(_U64, where)
        points = reader.array(_POINT2D, num_points, where)
        if image_id in images:
            raise reader.fail(f"image id {image_id} appears twice")
        images[image_id] = ColmapImage(
            id=image_id,
            qvec=np.array(pose[:4]),
            tvec=np.array(pose[4:]),
            camera_id=camera_id,
            name=name,
            xys=np.stack([points["x"], points["y"]], axis=1),
            point3d_ids=points["point3d_id"].astype(np.int64),
        )
    reader.finish("image")
    return images


def read_points(path: Path) -> ColmapPoints:
    """Vectorised: one Python pass finds where each variable-length record starts, then numpy
    gathers the fixed-size headers and the track elements from those offsets."""
    reader = _Reader(path)
    data = reader.data
    n = reader.count("points", _POINT3D.itemsize)
    offsets = []
    pos = reader.pos
    size = len(data)
    for i in range(n):
        if pos + _POINT3D.itemsize > size:
            raise reader.fail(f"truncated at point {i + 1} of {n}")
        offsets.append(pos)
        (length,) = _U64.unpack_from(data, pos + _TRACK_LENGTH_AT)
        pos += _POINT3D.itemsize + 8 * length
        if pos > size:
            raise reader.fail(f"truncated at point {i + 1} of {n} (track of {length})")
    reader.pos = pos
    reader.finish("point")

    buf = np.frombuffer(data, dtype=np.uint8)
    starts = np.asarray(offsets, dtype=np.int64)
    if n:
        headers = sliding_window_view(buf, _POINT3D.itemsize)[starts].view(_POINT3D)[:, 0]
    else:
        headers = np.zeros(0, _POINT3D)
    lengths = headers["track_length"].astype(np.int64)
    total = int(lengths.sum())
    first = np.repeat(starts + _POINT3D.itemsize, lengths)
    rank = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    if total:
        track = sliding_window_view(buf, 8)[first + 8 * rank].view("<i4")
    else:
        track = np.zeros((0, 2), "<i4")
    return ColmapPoints(
        ids=headers["id"].astype(np.int64),
        xyz=headers["xyz"].astype(np.float64),
        rgb=headers["rgb"].astype(np.uint8),
        errors=headers["error"].astype(np.float64),
        track_lengths=lengths,
        track_image_ids=track[:, 0].astype(np.int32),
        track_point2d_idx=track[:, 1].astype(np.int32),
    )


def cameras_bytes(cameras: dict[int, ColmapCamera]) -> bytes:
    parts = [_U64.pack(len(cameras))]
    for camera in cameras.values():
        model_id = MODEL_IDS[camera.model]
        parts.append(_CAMERA.pack(camera.id, model_id, camera.width, camera.height))
        parts.append(np.asarray(camera.params, dtype="<f8").tobytes())
    return b"".join(parts)


def images_bytes(images: dict[int, ColmapImage]) -> bytes:
    parts = [_U64.pack(len(images))]
    for image in images.values():
        pose = [*np.asarray(image.qvec, np.float64), *np.asarray(image.tvec, np.float64)]
        parts.append(_IMAGE.pack(image.id, *pose, image.camera_id))
        parts.append(image.name.encode("utf-8") + b"\x00")
        points = np.zeros(len(image.point3d_ids), _POINT2D)
        xys = np.asarray(image.xys, dtype=np.float64).reshape(-1, 2)
        points["x"], points["y"] = xys[:, 0], xys[:, 1]
        points["point3d_id"] = image.point3d_ids
        parts.append(_U64.pack(len(points)))
        parts.append(points.tobytes())
    return b"".join(parts)


def points_bytes(points: ColmapPoints) -> bytes:
    n = len(points)
    headers = np.zeros(n, _POINT3D)
    headers["id"] = points.ids
    headers["xyz"] = points.xyz
    headers["rgb"] = points.rgb
    headers["error"] = points.errors
    headers["track_length"] = points.track_lengths
    track = np.stack([points.track_image_ids, points.track_point2d_idx], axis=1).astype("<i4")
    header_bytes, track_bytes = headers.tobytes(), track.tobytes()
    ends = 8 * np.cumsum(np.asarray(points.track_lengths, dtype=np.int64))
    starts = ends - 8 * np.asarray(points.track_lengths, dtype=np.int64)
    size = _POINT3D.itemsize
    parts = [_U64.pack(n)]
    for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        parts.append(header_bytes[i * size : (i + 1) * size])
        parts.append(track_bytes[start:end])
    return b"".join(parts)
