"""COLMAP sparse models (cameras, images, points3D) in COLMAP's binary and text formats.

Reading is strict: a short, corrupt or inconsistent file raises :class:`ClmError` with the
file and the record where it went wrong, because a half-read model trains silently wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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

_NAMES = ("cameras", "images", "points3D")

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
            cameras=_read_cameras_bin(sparse_dir / "cameras.bin"),
            images=_read_images_bin(sparse_dir / "images.bin"),
            points=_read_points_bin(sparse_dir / "points3D.bin"),
        )
    return ColmapModel(
        cameras=_read_cameras_txt(sparse_dir / "cameras.txt"),
        images=_read_images_txt(sparse_dir / "images.txt"),
        points=_read_points_txt(sparse_dir / "points3D.txt"),
    )


def write_model(sparse_dir: Path, model: ColmapModel, binary: bool = True) -> None:
    """Write a sparse model in COLMAP's binary (default) or text format, creating the folder."""
    sparse_dir.mkdir(parents=True, exist_ok=True)
    for camera in model.cameras.values():
        _check_camera(sparse_dir / "cameras", camera)
    if binary:
        (sparse_dir / "cameras.bin").write_bytes(_cameras_bin(model.cameras))
        (sparse_dir / "images.bin").write_bytes(_images_bin(model.images))
        (sparse_dir / "points3D.bin").write_bytes(_points_bin(model.points))
    else:
        (sparse_dir / "cameras.txt").write_text(_cameras_txt(model.cameras))
        (sparse_dir / "images.txt").write_text(_images_txt(model.images))
        (sparse_dir / "points3D.txt").write_text(_points_txt(model.points))


def _model_format(folder: Path) -> str | None:
    for ext in (".bin", ".txt"):
        if all((folder / f"{name}{ext}").is_file() for name in _NAMES):
            return ext
    return None


def _check_camera(path: Path, camera: ColmapCamera) -> None:
    if camera.model not in MODEL_IDS:
        raise ClmError(f"{path}: camera {camera.id} has unknown model {camera.model!r}")
    expected = CAMERA_MODELS[MODEL_IDS[camera.model]][1]
    if len(camera.params) != expected:
        raise ClmError(
            f"{path}: camera {camera.id} ({camera.model}) has {len(camera.params)} "
            f"parameters, expected {expected}"
        )


# ---------------------------------------------------------------------------- binary reading


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


def _read_cameras_bin(path: Path) -> dict[int, ColmapCamera]:
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


def _read_images_bin(path: Path) -> dict[int, ColmapImage]:
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


def _read_points_bin(path: Path) -> ColmapPoints:
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


# ---------------------------------------------------------------------------- text reading


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


def _read_cameras_txt(path: Path) -> dict[int, ColmapCamera]:
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
        _check_camera(path, camera)
        if camera_id in cameras:
            raise ClmError(f"{path}: line {number}: camera id {camera_id} appears twice")
        cameras[camera_id] = camera
    return cameras


def _read_images_txt(path: Path) -> dict[int, ColmapImage]:
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


def _read_points_txt(path: Path) -> ColmapPoints:
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


# ---------------------------------------------------------------------------- writing


def _cameras_bin(cameras: dict[int, ColmapCamera]) -> bytes:
    parts = [_U64.pack(len(cameras))]
    for camera in cameras.values():
        model_id = MODEL_IDS[camera.model]
        parts.append(_CAMERA.pack(camera.id, model_id, camera.width, camera.height))
        parts.append(np.asarray(camera.params, dtype="<f8").tobytes())
    return b"".join(parts)


def _images_bin(images: dict[int, ColmapImage]) -> bytes:
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


def _points_bin(points: ColmapPoints) -> bytes:
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


def _cameras_txt(cameras: dict[int, ColmapCamera]) -> str:
    lines = [
        "# Camera list with one line of data per camera:",
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
        f"# Number of cameras: {len(cameras)}",
    ]
    for camera in cameras.values():
        params = " ".join(repr(float(p)) for p in camera.params)
        lines.append(f"{camera.id} {camera.model} {camera.width} {camera.height} {params}")
    return "\n".join(lines) + "\n"


def _images_txt(images: dict[int, ColmapImage]) -> str:
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


def _points_txt(points: ColmapPoints) -> str:
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
