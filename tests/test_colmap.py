"""COLMAP model I/O against bytes and text laid out by hand from COLMAP's format description."""

import struct
from pathlib import Path

import numpy as np
import pytest

from clm.data.colmap import (
    CAMERA_MODELS,
    ColmapCamera,
    ColmapImage,
    ColmapModel,
    ColmapPoints,
    find_sparse_dir,
    qvec_to_rotmat,
    read_model,
    rotmat_to_qvec,
    write_model,
)
from clm.errors import ClmError

# --------------------------------------------------------------------------- hand-built bytes

CAMERAS = [  # (id, model_id, width, height, params)
    (1, 1, 640, 480, [500.0, 510.0, 320.0, 240.0]),
    (7, 4, 800, 600, [600.0, 610.0, 400.5, 299.5, -0.1, 0.01, 0.001, -0.002]),
]
IMAGES = [  # (id, q, t, camera_id, name, [(x, y, point3d_id)])
    (
        3,
        (0.5, 0.5, -0.5, 0.5),
        (1.0, -2.0, 3.5),
        1,
        "frame_b.png",
        [(10.5, 20.25, 1), (3.0, 4.0, -1)],
    ),
    (5, (1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 7, "sub dir/frame_a.jpg", []),
]
POINTS = [  # (id, xyz, rgb, error, [(image_id, point2d_idx)])
    (1, (0.1, 0.2, 0.3), (255, 0, 17), 0.5, [(3, 0), (5, 12)]),
    (9, (-1.0, 2.0, -3.0), (1, 2, 3), 1.25, []),
    (4, (7.0, 8.0, 9.0), (100, 150, 200), 0.0, [(5, 1), (3, 2), (3, 7)]),
]


def cameras_bytes(cameras=CAMERAS) -> bytes:
    out = struct.pack("<Q", len(cameras))
    for camera_id, model_id, width, height, params in cameras:
        out += struct.pack("<iiQQ", camera_id, model_id, width, height)
        out += struct.pack(f"<{len(params)}d", *params)
    return out


def images_bytes(images=IMAGES) -> bytes:
    out = struct.pack("<Q", len(images))
    for image_id, q, t, camera_id, name, points in images:
        out += struct.pack("<i4d3di", image_id, *q, *t, camera_id)
        out += name.encode() + b"\x00"
        out += struct.pack("<Q", len(points))
        for x, y, point_id in points:
            out += struct.pack("<ddq", x, y, point_id)
    return out


def points_bytes(points=POINTS) -> bytes:
    out = struct.pack("<Q", len(points))
    for point_id, xyz, rgb, error, track in points:
        out += struct.pack("<Q3d3BdQ", point_id, *xyz, *rgb, error, len(track))
        for image_id, idx in track:
            out += struct.pack("<ii", image_id, idx)
    return out


def write_bytes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cameras.bin").write_bytes(cameras_bytes())
    (folder / "images.bin").write_bytes(images_bytes())
    (folder / "points3D.bin").write_bytes(points_bytes())
    return folder


CAMERAS_TXT = """# Camera list with one line of data per camera:
#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]
# Number of cameras: 2
1 PINHOLE 640 480 500 510 320 240

7 OPENCV 800 600 600 610 400.5 299.5 -0.1 0.01 0.001 -0.002
"""
IMAGES_TXT = """# Image list with two lines of data per image:
#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME
#   POINTS2D[] as (X, Y, POINT3D_ID)
# Number of images: 2, mean observations per image: 1
3 0.5 0.5 -0.5 0.5 1 -2 3.5 1 frame_b.png
10.5 20.25 1 3 4 -1
5 1 0 0 0 0 0 0 7 sub dir/frame_a.jpg

"""
POINTS_TXT = """# 3D point list with one line of data per point:
#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)
1 0.1 0.2 0.3 255 0 17 0.5 3 0 5 12
9 -1 2 -3 1 2 3 1.25
4 7 8 9 100 150 200 0 5 1 3 2 3 7
"""


def write_text(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cameras.txt").write_text(CAMERAS_TXT)
    (folder / "images.txt").write_text(IMAGES_TXT)
    (folder / "points3D.txt").write_text(POINTS_TXT)
    return folder


def check_expected(model: ColmapModel) -> None:
    """The model equals the CAMERAS/IMAGES/POINTS tables above, field by field."""
    assert list(model.cameras) == [1, 7]
    for camera_id, model_id, width, height, params in CAMERAS:
        camera = model.cameras[camera_id]
        assert (camera.id, camera.model) == (camera_id, CAMERA_MODELS[model_id][0])
        assert (camera.width, camera.height) == (width, height)
        assert camera.params.dtype == np.float64
        np.testing.assert_array_equal(camera.params, params)
    assert list(model.images) == [3, 5]
    for image_id, q, t, camera_id, name, points in IMAGES:
        image = model.images[image_id]
        assert (image.camera_id, image.name) == (camera_id, name)
        np.testing.assert_array_equal(image.qvec, q)
        np.testing.assert_array_equal(image.tvec, t)
        assert image.xys.shape == (len(points), 2) and image.xys.dtype == np.float64
        assert image.point3d_ids.dtype == np.int64
        np.testing.assert_array_equal(image.xys, [p[:2] for p in points] or np.zeros((0, 2)))
        np.testing.assert_array_equal(image.point3d_ids, [p[2] for p in points])
    pts = model.points
    np.testing.assert_array_equal(pts.ids, [1, 9, 4])
    np.testing.assert_array_equal(pts.xyz, [p[1] for p in POINTS])
    np.testing.assert_array_equal(pts.rgb, [p[2] for p in POINTS])
    np.testing.assert_array_equal(pts.errors, [0.5, 1.25, 0.0])
    np.testing.assert_array_equal(pts.track_lengths, [2, 0, 3])
    np.testing.assert_array_equal(pts.track_image_ids, [3, 5, 5, 3, 3])
    np.testing.assert_array_equal(pts.track_point2d_idx, [0, 12, 1, 2, 7])
    expected_types = (np.int64, np.float64, np.uint8, np.float64, np.int64, np.int32, np.int32)
    fields = ("ids", "xyz", "rgb", "errors", "track_lengths", "track_image_ids")
    for name, dtype in zip((*fields, "track_point2d_idx"), expected_types, strict=True):
        assert getattr(pts, name).dtype == dtype, name


# --------------------------------------------------------------------------- reading


def test_reads_hand_built_binary(tmp_path):
    check_expected(read_model(write_bytes(tmp_path)))


def test_reads_hand_written_text(tmp_path):
    check_expected(read_model(write_text(tmp_path)))


def test_writer_produces_the_spec_bytes(tmp_path):
    model = read_model(write_text(tmp_path / "txt"))
    write_model(tmp_path / "out", model)
    assert (tmp_path / "out/cameras.bin").read_bytes() == cameras_bytes()
    assert (tmp_path / "out/images.bin").read_bytes() == images_bytes()
    assert (tmp_path / "out/points3D.bin").read_bytes() == points_bytes()


def test_binary_text_round_trip(tmp_path):
    write_model(tmp_path / "txt", read_model(write_bytes(tmp_path / "bin")), binary=False)
    text_model = read_model(tmp_path / "txt")
    check_expected(text_model)
    write_model(tmp_path / "bin2", text_model, binary=True)
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        assert (tmp_path / "bin2" / name).read_bytes() == (tmp_path / "bin" / name).read_bytes()


def test_text_round_trip_keeps_every_float_bit(tmp_path):
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(50, 3)) * 1e3
    points = ColmapPoints(
        ids=np.arange(50, dtype=np.int64),
        xyz=xyz,
        rgb=rng.integers(0, 256, (50, 3), dtype=np.uint8),
        errors=rng.random(50),
        track_lengths=np.full(50, 1, np.int64),
        track_image_ids=np.full(50, 1, np.int32),
        track_point2d_idx=np.arange(50, dtype=np.int32),
    )
    camera = ColmapCamera(1, "SIMPLE_RADIAL", 10, 10, rng.random(4))
    image = ColmapImage(1, rng.normal(size=4), rng.normal(size=3), 1, "a.png")
    write_model(tmp_path, ColmapModel({1: camera}, {1: image}, points), binary=False)
    back = read_model(tmp_path)
    np.testing.assert_array_equal(back.points.xyz, xyz)
    np.testing.assert_array_equal(back.cameras[1].params, camera.params)
    np.testing.assert_array_equal(back.images[1].qvec, image.qvec)
    assert back.images[1].xys.shape == (0, 2)


def test_many_points_match_an_independent_reader(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(2000):
        track = [(int(a), int(b)) for a, b in rng.integers(0, 1000, (rng.integers(0, 7), 2))]
        xyz = tuple(rng.normal(size=3))
        rgb = tuple(int(c) for c in rng.integers(0, 256, 3))
        records.append((10 * i + 3, xyz, rgb, float(rng.random()), track))
    (tmp_path / "points3D.bin").write_bytes(points_bytes(records))
    (tmp_path / "cameras.bin").write_bytes(cameras_bytes([]))
    (tmp_path / "images.bin").write_bytes(images_bytes([]))
    pts = read_model(tmp_path).points
    np.testing.assert_array_equal(pts.ids, [r[0] for r in records])
    np.testing.assert_array_equal(pts.xyz, [r[1] for r in records])
    np.testing.assert_array_equal(pts.rgb, [r[2] for r in records])
    np.testing.assert_array_equal(pts.track_lengths, [len(r[4]) for r in records])
    flat = [pair for r in records for pair in r[4]]
    np.testing.assert_array_equal(pts.track_image_ids, [a for a, _ in flat])
    np.testing.assert_array_equal(pts.track_point2d_idx, [b for _, b in flat])


def test_empty_point_cloud_round_trips(tmp_path):
    write_model(tmp_path, ColmapModel({}, {}, ColmapPoints.empty()))
    assert (tmp_path / "points3D.bin").read_bytes() == struct.pack("<Q", 0)
    assert len(read_model(tmp_path).points) == 0
    write_model(tmp_path / "t", ColmapModel({}, {}, ColmapPoints.empty()), binary=False)
    assert read_model(tmp_path / "t").points.xyz.shape == (0, 3)


def test_binary_preferred_over_text(tmp_path):
    write_bytes(tmp_path)
    write_text(tmp_path)
    (tmp_path / "cameras.txt").write_text("1 PINHOLE 1 1 1 1 1 1\n")
    assert list(read_model(tmp_path).cameras) == [1, 7]


# --------------------------------------------------------------------------- corrupt input


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("cameras.bin", cameras_bytes()),
        ("images.bin", images_bytes()),
        ("points3D.bin", points_bytes()),
    ],
)
def test_every_truncation_is_a_clm_error_naming_the_file(tmp_path, name, data):
    write_bytes(tmp_path)
    for cut in range(len(data)):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(ClmError) as info:
            read_model(tmp_path)
        assert name in str(info.value) and "\n" not in str(info.value)


def test_truncation_message_says_where(tmp_path):
    write_bytes(tmp_path)
    (tmp_path / "images.bin").write_bytes(images_bytes()[:-10])
    with pytest.raises(ClmError, match=r"images\.bin: truncated at image 2 of 2"):
        read_model(tmp_path)
    (tmp_path / "images.bin").write_bytes(images_bytes())
    (tmp_path / "points3D.bin").write_bytes(points_bytes()[:-4])
    with pytest.raises(ClmError, match=r"points3D\.bin: truncated at point 3 of 3"):
        read_model(tmp_path)


def test_count_larger_than_the_file(tmp_path):
    write_bytes(tmp_path)
    (tmp_path / "points3D.bin").write_bytes(struct.pack("<Q", 10**12) + points_bytes()[8:])
    with pytest.raises(ClmError, match=r"points3D\.bin: header says 1000000000000 points"):
        read_model(tmp_path)


def test_huge_track_length_is_truncation(tmp_path):
    write_bytes(tmp_path)
    bad = struct.pack("<QQ3d3BdQ", 1, 1, 0.0, 0.0, 0.0, 0, 0, 0, 0.0, 2**40)
    (tmp_path / "points3D.bin").write_bytes(bad)
    with pytest.raises(ClmError, match=r"points3D\.bin: truncated at point 1 of 1"):
        read_model(tmp_path)


def test_name_without_terminator(tmp_path):
    write_bytes(tmp_path)
    record = struct.pack("<Qi4d3di", 1, 1, 1.0, 0, 0, 0, 0, 0, 0, 1) + b"no_terminator.png" * 3
    (tmp_path / "images.bin").write_bytes(record)
    with pytest.raises(ClmError, match=r"images\.bin: .*image 1 of 1.*NUL"):
        read_model(tmp_path)


def test_trailing_bytes(tmp_path):
    write_bytes(tmp_path)
    (tmp_path / "cameras.bin").write_bytes(cameras_bytes() + b"\x00\x01")
    with pytest.raises(ClmError, match=r"cameras\.bin: 2 unexpected bytes"):
        read_model(tmp_path)


def test_unknown_camera_model_binary(tmp_path):
    write_bytes(tmp_path)
    (tmp_path / "cameras.bin").write_bytes(cameras_bytes([(2, 99, 10, 10, [])]))
    with pytest.raises(ClmError, match=r"cameras\.bin: camera 2 has unknown model id 99"):
        read_model(tmp_path)


def test_unknown_camera_model_text(tmp_path):
    write_text(tmp_path)
    (tmp_path / "cameras.txt").write_text("1 FISHEYE_9000 10 10 1 2 3\n")
    with pytest.raises(ClmError, match=r"cameras\.txt: camera 1 has unknown model 'FISHEYE_9000'"):
        read_model(tmp_path)


def test_wrong_parameter_count_text(tmp_path):
    write_text(tmp_path)
    (tmp_path / "cameras.txt").write_text("1 PINHOLE 10 10 1 2 3\n")
    with pytest.raises(ClmError, match=r"cameras\.txt: camera 1 \(PINHOLE\) has 3 parameters"):
        read_model(tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("cameras.txt", "1 PINHOLE 64O 480 1 1 1 1\n", r"cameras\.txt: line 1: '64O'"),
        ("images.txt", "# c\n3 1 0 0 0 a 0 0 1 x.png\n\n", r"images\.txt: line 2: 'a'"),
        ("images.txt", "3 1 0 0 0 0 0 0 1 x.png\n1.0 2.0\n", r"images\.txt: line 2: POINTS2D"),
        ("images.txt", "3 1 0 0 0 0 0 0 1\n\n", r"images\.txt: line 1: expected IMAGE_ID"),
        ("points3D.txt", "1 0 0 0 1 2 3 0.5 1 x\n", r"points3D\.txt: line 1: 'x'"),
        ("points3D.txt", "1 0 0 0 1 2 3 0.5\n2 0 0 0 1 2 3 0.5 1.5 0\n", r"line 2: '1\.5'"),
        ("points3D.txt", "1 0 0 0 1 2 3 0.5 1\n", r"points3D\.txt: line 1: expected POINT3D_ID"),
        ("points3D.txt", "1 0 0 0 1 256 3 0.5\n", r"points3D\.txt: line 1: colour"),
    ],
)
def test_corrupt_text(tmp_path, name, text, message):
    write_text(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(ClmError, match=message):
        read_model(tmp_path)


def test_text_observations_line_may_be_missing_at_end_of_file(tmp_path):
    write_text(tmp_path)
    (tmp_path / "images.txt").write_text("3 1 0 0 0 0 0 0 1 last.png")
    assert read_model(tmp_path).images[3].name == "last.png"


# --------------------------------------------------------------------------- locating


def test_find_sparse_dir_prefers_sparse_0(tmp_path):
    write_bytes(tmp_path / "sparse")
    assert find_sparse_dir(tmp_path) == tmp_path / "sparse"
    write_text(tmp_path / "sparse" / "0")
    assert find_sparse_dir(tmp_path) == tmp_path / "sparse" / "0"


def test_find_sparse_dir_missing(tmp_path):
    (tmp_path / "sparse" / "0").mkdir(parents=True)
    (tmp_path / "sparse" / "0" / "cameras.bin").write_bytes(cameras_bytes())
    (tmp_path / "sparse" / "0" / "images.txt").write_text(IMAGES_TXT)
    (tmp_path / "sparse" / "0" / "points3D.bin").write_bytes(points_bytes())
    with pytest.raises(ClmError, match=f"{tmp_path}: no COLMAP model found"):
        find_sparse_dir(tmp_path)
    with pytest.raises(ClmError, match=r"0: no complete COLMAP model"):
        read_model(tmp_path / "sparse" / "0")


# --------------------------------------------------------------------------- tables and poses


def test_camera_model_table():
    expected = {
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
    }
    assert {k: CAMERA_MODELS[k] for k in expected} == expected


def test_quaternion_conventions():
    # 90 degrees about z: x goes to y.
    q = np.array([np.cos(np.pi / 4), 0.0, 0.0, np.sin(np.pi / 4)])
    np.testing.assert_allclose(qvec_to_rotmat(q), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(rotmat_to_qvec(qvec_to_rotmat(q)), q, atol=1e-15)
    # 180 degrees about x, where a trace-based formula divides by zero.
    np.testing.assert_allclose(rotmat_to_qvec(np.diag([1.0, -1.0, -1.0])), [0, 1, 0, 0], atol=1e-15)
    rng = np.random.default_rng(3)
    for _ in range(100):
        q = rng.normal(size=4)
        q = q / np.linalg.norm(q) * np.sign(q[0])
        np.testing.assert_allclose(rotmat_to_qvec(qvec_to_rotmat(q)), q, atol=1e-12)


def test_image_world_to_camera():
    image = ColmapImage(1, np.array([0.0, 1.0, 0.0, 0.0]), np.array([1.0, 2.0, 3.0]), 1, "a")
    np.testing.assert_allclose(
        image.world_to_camera(),
        [[1, 0, 0, 1], [0, -1, 0, 2], [0, 0, -1, 3], [0, 0, 0, 1]],
        atol=1e-15,
    )
