"""load_scene on small hand-made COLMAP, NeRF-synthetic and nerfstudio folders."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plyfile import PlyData, PlyElement

from clm.data.colmap import (
    ColmapCamera,
    ColmapImage,
    ColmapModel,
    ColmapPoints,
    read_model,
    rotmat_to_qvec,
    write_model,
)
from clm.data.images import ImageCache
from clm.data.scene import RANDOM_INIT_POINTS, load_scene
from clm.data.undistort import undistorted_camera
from clm.errors import ClmError


def save_png(path: Path, width: int, height: int, alpha: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 4 if alpha else 3
    pixels = np.full((height, width, channels), 90, dtype=np.uint8)
    if alpha:
        pixels[..., 3] = 0  # fully transparent: decodes to the background
    Image.fromarray(pixels).save(path)


def look_at(center: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV world-to-camera of a camera at ``center`` looking at ``target`` (y down = -z up)."""
    forward = (target - center) / np.linalg.norm(target - center)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rot, -rot @ center
    return out


def ring_centers(n: int, radius: float = 4.0, offset=(10.0, -3.0, 2.0)) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles), np.ones(n)], 1) + offset


def colmap_scene(
    root: Path,
    n: int = 5,
    cameras: dict[int, ColmapCamera] | None = None,
    camera_of=lambda i: 1,
    image_size=None,
    points: ColmapPoints | None = None,
    sparse: str = "sparse/0",
    binary: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Cameras on a ring looking at OFFSET; returns (world-to-camera [n,4,4], points xyz)."""
    cameras = cameras or {1: ColmapCamera(1, "PINHOLE", 40, 30, np.array([50.0, 52.0, 20.0, 15.0]))}
    target = np.array([10.0, -3.0, 2.0])
    w2cs, images = [], {}
    for i, center in enumerate(ring_centers(n)):
        w2c = look_at(center, target)
        w2cs.append(w2c)
        camera = cameras[camera_of(i)]
        name = f"img_{i:02d}.png"
        images[i + 1] = ColmapImage(
            i + 1, rotmat_to_qvec(w2c[:3, :3]), w2c[:3, 3].copy(), camera.id, name
        )
        size = image_size(i) if image_size else (camera.width, camera.height)
        save_png(root / "images" / name, *size)
    if points is None:
        xyz = target + np.random.default_rng(0).normal(size=(20, 3))
        points = ColmapPoints(
            ids=np.arange(20, dtype=np.int64),
            xyz=xyz,
            rgb=np.full((20, 3), 7, np.uint8),
            errors=np.zeros(20),
            track_lengths=np.zeros(20, np.int64),
            track_image_ids=np.zeros(0, np.int32),
            track_point2d_idx=np.zeros(0, np.int32),
        )
    write_model(root / sparse, ColmapModel(cameras, images, points), binary=binary)
    return np.stack(w2cs), points.xyz


def project(k: np.ndarray, w2c: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    return (cam @ k.T)[:, :2] / cam[:, 2:]


# --------------------------------------------------------------------------- COLMAP


def test_pinhole_scene(tmp_path):
    w2cs, xyz = colmap_scene(tmp_path, n=6)
    scene = load_scene(tmp_path, test_every=0, normalize=False)
    assert scene.kind == "colmap" and scene.background == (0.0, 0.0, 0.0)
    assert not scene.random_init and scene.test == []
    assert [f.name for f in scene.train] == [f"img_{i:02d}.png" for i in range(6)]
    for frame, w2c in zip(scene.train, w2cs, strict=True):
        assert (frame.width, frame.height, frame.distortion, frame.resize_from) == (
            40,
            30,
            None,
            None,
        )
        np.testing.assert_array_equal(frame.K, [[50, 0, 20], [0, 52, 15], [0, 0, 1]])
        np.testing.assert_allclose(frame.world_to_camera, w2c, atol=1e-12)
        assert frame.image_path == tmp_path / "images" / frame.name
    np.testing.assert_allclose(scene.points, xyz.astype(np.float32))
    assert scene.points.dtype == np.float32 and scene.colors.dtype == np.uint8
    np.testing.assert_array_equal(scene.colors, 7)


def test_simple_pinhole_and_several_cameras(tmp_path):
    cameras = {
        1: ColmapCamera(1, "SIMPLE_PINHOLE", 40, 30, np.array([45.0, 20.5, 14.5])),
        2: ColmapCamera(2, "PINHOLE", 24, 20, np.array([30.0, 31.0, 12.0, 10.0])),
    }
    colmap_scene(tmp_path, n=4, cameras=cameras, camera_of=lambda i: 1 + i % 2)
    scene = load_scene(tmp_path, test_every=0)
    by_camera = {f.camera_id: f for f in scene.train}
    np.testing.assert_array_equal(by_camera[1].K, [[45, 0, 20.5], [0, 45, 14.5], [0, 0, 1]])
    np.testing.assert_array_equal(by_camera[2].K, [[30, 0, 12], [0, 31, 10], [0, 0, 1]])
    assert (by_camera[2].width, by_camera[2].height) == (24, 20)


def test_text_model_in_sparse_without_0(tmp_path):
    colmap_scene(tmp_path, sparse="sparse", binary=False)
    assert len(load_scene(tmp_path, test_every=0).train) == 5


def test_split_every_nth_by_name(tmp_path):
    colmap_scene(tmp_path, n=10)
    scene = load_scene(tmp_path, test_every=3)
    assert [f.name for f in scene.test] == ["img_00.png", "img_03.png", "img_06.png", "img_09.png"]
    assert [f.name for f in scene.train] == [f"img_{i:02d}.png" for i in (1, 2, 4, 5, 7, 8)]


def test_normalisation(tmp_path):
    w2cs, xyz = colmap_scene(tmp_path, n=8)
    k = np.array([[50, 0, 20], [0, 52, 15], [0, 0, 1.0]])
    scene = load_scene(tmp_path, test_every=4)
    sim = scene.to_train
    centers = np.stack([f.camera_center for f in scene.train])
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1).max(), 1.0)
    np.testing.assert_allclose(centers.mean(axis=0), 0.0, atol=1e-12)
    assert scene.extent == pytest.approx(1.1)
    # The mean of the training cameras (ring positions 1, 2, 3, 5, 6, 7) is the centre.
    world_centers = ring_centers(8)[[1, 2, 3, 5, 6, 7]]
    np.testing.assert_allclose(sim.center, world_centers.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(sim.to_world(sim.to_train(xyz)), xyz, atol=1e-12)
    np.testing.assert_allclose(scene.points, sim.to_train(xyz), atol=1e-5)
    # A world point projects to the same pixel before and after, for train and test frames.
    frames = {f.name: f for f in scene.train + scene.test}
    for i, w2c in enumerate(w2cs):
        frame = frames[f"img_{i:02d}.png"]
        np.testing.assert_allclose(
            project(frame.K, frame.world_to_camera, sim.to_train(xyz)), project(k, w2c, xyz)
        )


def test_extent_without_normalisation(tmp_path):
    colmap_scene(tmp_path, n=8)
    scene = load_scene(tmp_path, test_every=0, normalize=False)
    assert scene.to_train.scale == 1.0
    assert scene.extent == pytest.approx(1.1 * 4.0)


def test_data_factor_folder(tmp_path):
    camera = ColmapCamera(1, "PINHOLE", 41, 30, np.array([50.0, 52.0, 20.5, 15.0]))
    colmap_scene(tmp_path, n=2, cameras={1: camera})
    save_png(tmp_path / "images_2" / "img_00.png", 21, 15)  # 41 / 2 = 20.5, rounded up
    save_png(tmp_path / "images_2" / "img_01.png", 20, 15)  # and rounded down
    scene = load_scene(tmp_path, data_factor=2, test_every=0, normalize=False)
    a, b = scene.train
    assert a.image_path == tmp_path / "images_2" / "img_00.png" and a.resize_from is None
    assert (a.width, a.height, b.width, b.height) == (21, 15, 20, 15)
    np.testing.assert_allclose(a.K, [[50 * 21 / 41, 0, 20.5 * 21 / 41], [0, 26, 7.5], [0, 0, 1]])
    np.testing.assert_allclose(b.K, [[50 * 20 / 41, 0, 20.5 * 20 / 41], [0, 26, 7.5], [0, 0, 1]])


def test_data_factor_resize_fallback(tmp_path):
    colmap_scene(tmp_path, n=2)
    scene = load_scene(tmp_path, data_factor=4, test_every=0, normalize=False)
    frame = scene.train[0]
    assert frame.image_path == tmp_path / "images" / "img_00.png"
    assert frame.resize_from == (40, 30) and (frame.width, frame.height) == (10, 8)  # 7.5 -> 8
    np.testing.assert_allclose(frame.K, [[12.5, 0, 5], [0, 52 * 8 / 30, 4], [0, 0, 1]])
    image = ImageCache(scene.train, tmp_path / "cache", scene.background).get(0)
    assert image.shape == (8, 10, 3)


def test_factor_folder_with_a_missing_image(tmp_path):
    colmap_scene(tmp_path, n=2)
    save_png(tmp_path / "images_2" / "img_00.png", 20, 15)
    with pytest.raises(ClmError, match=r"images_2/img_01\.png: image not found"):
        load_scene(tmp_path, data_factor=2)


def test_distorted_camera_is_undistorted(tmp_path):
    params = np.array([50.0, 51.0, 20.0, 15.0, -0.05, 0.01, 0.001, 0.002])
    colmap_scene(tmp_path, n=2, cameras={1: ColmapCamera(1, "OPENCV", 40, 30, params)})
    scene = load_scene(tmp_path, data_factor=2, test_every=0)
    frame = scene.train[0]
    d = frame.distortion
    assert (d.model, d.params) == ("OPENCV", (-0.05, 0.01, 0.001, 0.002))
    assert (d.fx, d.fy, d.cx, d.cy, d.width, d.height) == (25.0, 25.5, 10.0, 7.5, 20, 15)
    k, w, h = undistorted_camera(d)
    np.testing.assert_array_equal(frame.K, k)
    assert (frame.width, frame.height) == (w, h)
    image = ImageCache(scene.train, tmp_path / "cache", scene.background).get(0)
    assert image.shape == (h, w, 3)


def test_radial_with_zero_coefficients_is_a_pinhole(tmp_path):
    params = np.array([50.0, 20.0, 15.0, 0.0, 0.0])
    colmap_scene(tmp_path, n=2, cameras={1: ColmapCamera(1, "RADIAL", 40, 30, params)})
    frame = load_scene(tmp_path, test_every=0).train[0]
    assert frame.distortion is None
    np.testing.assert_array_equal(frame.K, [[50, 0, 20], [0, 50, 15], [0, 0, 1]])


def test_unsupported_distortion_model(tmp_path):
    params = np.array([50.0, 50.0, 20.0, 15.0, 0.1, 0.0, 0.0, 0.0])
    colmap_scene(
        tmp_path,
        n=2,
        cameras={3: ColmapCamera(3, "OPENCV_FISHEYE", 40, 30, params)},
        camera_of=lambda i: 3,
    )
    with pytest.raises(ClmError) as info:
        load_scene(tmp_path)
    message = str(info.value)
    assert "sparse/0/cameras.bin: camera 3: camera model OPENCV_FISHEYE" in message
    assert "colmap image_undistorter" in message


def test_missing_image(tmp_path):
    colmap_scene(tmp_path, n=3)
    (tmp_path / "images" / "img_01.png").unlink()
    with pytest.raises(ClmError, match=r"images/img_01\.png: image not found"):
        load_scene(tmp_path)


def test_missing_images_folder(tmp_path):
    colmap_scene(tmp_path, n=3)
    for path in (tmp_path / "images").iterdir():
        path.unlink()
    (tmp_path / "images").rmdir()
    with pytest.raises(ClmError, match=r"images: image folder not found"):
        load_scene(tmp_path)


def test_image_of_wrong_size(tmp_path):
    colmap_scene(tmp_path, n=3, image_size=lambda i: (33, 30) if i == 2 else (40, 30))
    with pytest.raises(ClmError, match=r"images/img_02\.png: image is 33x30, expected 40x30$"):
        load_scene(tmp_path)


def test_image_of_wrong_size_for_the_factor(tmp_path):
    colmap_scene(tmp_path, n=1)
    save_png(tmp_path / "images_2" / "img_00.png", 40, 30)
    with pytest.raises(ClmError, match=r"img_00\.png: image is 40x30, expected 20x15 \(the came"):
        load_scene(tmp_path, data_factor=2)


def test_corrupt_image_header(tmp_path):
    colmap_scene(tmp_path, n=2)
    (tmp_path / "images" / "img_01.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ClmError, match=r"img_01\.png: not a readable image"):
        load_scene(tmp_path)


def test_empty_point_cloud(tmp_path):
    colmap_scene(tmp_path, n=2, points=ColmapPoints.empty())
    with pytest.raises(ClmError, match=r"sparse/0/points3D\.bin: the point cloud is empty"):
        load_scene(tmp_path)


def test_image_with_undefined_camera(tmp_path):
    cameras = {2: ColmapCamera(2, "PINHOLE", 40, 30, np.array([50.0, 52.0, 20.0, 15.0]))}
    colmap_scene(tmp_path, n=2, cameras=cameras, camera_of=lambda i: 2)
    model = read_model(tmp_path / "sparse/0")
    model.images[2].camera_id = 5
    write_model(tmp_path / "sparse/0", model)
    with pytest.raises(ClmError, match=r"images\.bin: image img_01\.png uses camera 5, which came"):
        load_scene(tmp_path)


@pytest.mark.parametrize(
    "qvec, tvec",
    [([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0]), ([1.0, 0.0, 0.0, 0.0], [1.0, float("nan"), 3.0])],
    ids=["zero-quaternion", "nan-translation"],
)
def test_image_with_an_unusable_pose(tmp_path, qvec, tvec):
    """One bad pose used to turn every frame's pose (through the normalisation) into NaN."""
    colmap_scene(tmp_path, n=3)
    model = read_model(tmp_path / "sparse/0")
    model.images[2].qvec, model.images[2].tvec = np.array(qvec), np.array(tvec)
    write_model(tmp_path / "sparse/0", model)
    with pytest.raises(ClmError, match=r"images\.bin: image img_01\.png has an unusable pose"):
        load_scene(tmp_path)


@pytest.mark.parametrize("fx", [0.0, -50.0, float("inf")])
def test_camera_with_an_unusable_focal_length(tmp_path, fx):
    cameras = {1: ColmapCamera(1, "PINHOLE", 40, 30, np.array([fx, 52.0, 20.0, 15.0]))}
    colmap_scene(tmp_path, n=2, cameras=cameras)
    with pytest.raises(ClmError, match=rf"cameras\.bin: camera 1: intrinsics fx={fx:g}, fy=52,"):
        load_scene(tmp_path)


def test_model_without_images(tmp_path):
    colmap_scene(tmp_path, n=2)
    model = read_model(tmp_path / "sparse/0")
    model.images = {}
    write_model(tmp_path / "sparse/0", model)
    with pytest.raises(ClmError, match=r"sparse/0/images\.bin: the model has no images"):
        load_scene(tmp_path)


def test_not_a_scene(tmp_path):
    with pytest.raises(ClmError, match=f"{tmp_path}: not a scene folder"):
        load_scene(tmp_path)
    with pytest.raises(ClmError, match=r"nowhere: scene folder not found"):
        load_scene(tmp_path / "nowhere")
    (tmp_path / "sparse").mkdir()
    with pytest.raises(ClmError, match=r"no COLMAP model found"):
        load_scene(tmp_path)


def test_bad_arguments(tmp_path):
    colmap_scene(tmp_path, n=2)
    with pytest.raises(ClmError, match="--data-factor"):
        load_scene(tmp_path, data_factor=0)
    with pytest.raises(ClmError, match="--test-every"):
        load_scene(tmp_path, test_every=-1)
    with pytest.raises(ClmError, match="no training images"):
        load_scene(tmp_path, test_every=1)


# --------------------------------------------------------------------------- NeRF-synthetic

GL_CAMERA_AT_Z4 = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]


def blender_scene(root: Path, angle: float = 0.7, n_train: int = 3) -> None:
    def matrix(i: int) -> list:
        # The GL camera at (0, 0, 4) looking down -z at the origin, turned about the y axis.
        c, s = math.cos(0.3 * i), math.sin(0.3 * i)
        rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        out = np.eye(4)
        out[:3, :3], out[:3, 3] = rot, rot @ [0, 0, 4.0]
        return out.tolist()

    for split, count in (("train", n_train), ("test", 2)):
        frames = []
        for i in range(count):
            save_png(root / split / f"r_{i}.png", 16, 12, alpha=True)
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": matrix(i)})
        meta = {"camera_angle_x": angle, "frames": frames}
        (root / f"transforms_{split}.json").write_text(json.dumps(meta))


def test_blender_scene(tmp_path):
    blender_scene(tmp_path)
    scene = load_scene(tmp_path, test_every=8, normalize=False)
    assert scene.kind == "blender" and scene.background == (1.0, 1.0, 1.0)
    assert [f.name for f in scene.train] == ["train/r_0.png", "train/r_1.png", "train/r_2.png"]
    assert [f.name for f in scene.test] == ["test/r_0.png", "test/r_1.png"]
    frame = scene.train[0]
    focal = 0.5 * 16 / math.tan(0.35)
    np.testing.assert_allclose(frame.K, [[focal, 0, 8], [0, focal, 6], [0, 0, 1]])
    assert (frame.width, frame.height) == (16, 12)
    image = ImageCache(scene.train, tmp_path / "cache", scene.background).get(0)
    np.testing.assert_array_equal(image, 255)  # transparent pixels over white


def test_opengl_pose_becomes_opencv(tmp_path):
    blender_scene(tmp_path, n_train=1)
    frame = load_scene(tmp_path, normalize=False).train[0]
    # GL camera at (0, 0, 4) looking down -z: the origin is 4 in front of it.
    np.testing.assert_allclose(frame.world_to_camera[:3, 3], [0, 0, 4])
    np.testing.assert_allclose(frame.camera_center, [0, 0, 4])
    cam = frame.world_to_camera @ np.array([[0, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1.0]]).T
    assert np.all(cam[2] > 0)  # in front: positive z
    pixels = (frame.K @ cam[:3]) / cam[2]
    np.testing.assert_allclose(pixels[:2, 0], [8, 6])  # the origin at the image centre
    assert pixels[0, 1] > 8  # world +x appears on the right
    assert pixels[1, 2] < 6  # world +y (up in OpenGL) appears above the centre


def test_blender_random_init(tmp_path):
    blender_scene(tmp_path)
    scene = load_scene(tmp_path)
    assert scene.random_init and scene.points.shape == (RANDOM_INIT_POINTS, 3)
    assert scene.colors.shape == (RANDOM_INIT_POINTS, 3) and scene.colors.dtype == np.uint8
    # The axes all meet at the world origin: the box is centred there, in training units.
    origin = scene.to_train.to_train(np.zeros(3))
    half = 4.0 * 8 / (0.5 * 16 / math.tan(0.35)) * scene.to_train.scale
    lo, hi = scene.points.min(axis=0), scene.points.max(axis=0)
    np.testing.assert_allclose(lo, origin - half, atol=1e-3 * half)
    np.testing.assert_allclose(hi, origin + half, atol=1e-3 * half)
    same = load_scene(tmp_path)
    np.testing.assert_array_equal(same.points, scene.points)
    assert not np.array_equal(load_scene(tmp_path, seed=1).points, scene.points)


def test_blender_data_factor_resizes(tmp_path):
    blender_scene(tmp_path)
    frame = load_scene(tmp_path, data_factor=2).train[0]
    assert frame.resize_from == (16, 12) and (frame.width, frame.height) == (8, 6)
    assert frame.K[0, 0] == pytest.approx(0.25 * 16 / math.tan(0.35))


def test_blender_bad_json(tmp_path):
    blender_scene(tmp_path)
    (tmp_path / "transforms_train.json").write_text('{"camera_angle_x": 0.7, "frames": [')
    with pytest.raises(ClmError, match=r"transforms_train\.json: invalid JSON"):
        load_scene(tmp_path)
    (tmp_path / "transforms_train.json").write_text('{"camera_angle_x": 0.7, "frames": [{}]}')
    with pytest.raises(ClmError, match=r"transforms_train\.json: frame 0: missing 'file_path'"):
        load_scene(tmp_path)


@pytest.mark.parametrize("angle_y", [0.0, math.pi])
def test_blender_camera_angle_y_outside_0_pi(tmp_path, angle_y):
    """camera_angle_y 0 was a ZeroDivisionError, pi a focal length of almost 0."""
    blender_scene(tmp_path)
    path = tmp_path / "transforms_train.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "camera_angle_y": angle_y}))
    with pytest.raises(ClmError, match=r"transforms_train\.json: camera_angle_y .* not an angle"):
        load_scene(tmp_path)


# --------------------------------------------------------------------------- nerfstudio


def nerfstudio_scene(root: Path, with_ply: bool = True, **top) -> None:
    frames = []
    for i in range(4):
        save_png(root / "images" / f"frame_{i:05d}.png", 32, 24)
        c2w = np.eye(4)
        c2w[:3, 3] = [i * 0.5, 0, 3.0]
        frames.append({"file_path": f"images/frame_{i:05d}.png", "transform_matrix": c2w.tolist()})
    frames[3].update({"fl_x": 40.0, "w": 32, "h": 24})
    meta = {"fl_x": 30.0, "fl_y": 31.0, "cx": 16.5, "cy": 12.0, "w": 32, "h": 24, **top}
    meta["frames"] = frames
    if with_ply:
        vertex = np.array(
            [(1.0, 2.0, 3.0, 10, 20, 30), (-1.0, 0.5, 0.0, 200, 100, 0)],
            dtype=[
                ("x", "f4"),
                ("y", "f4"),
                ("z", "f4"),
                ("red", "u1"),
                ("green", "u1"),
                ("blue", "u1"),
            ],
        )
        PlyData([PlyElement.describe(vertex, "vertex")]).write(str(root / "points.ply"))
        meta["ply_file_path"] = "points.ply"
    (root / "transforms.json").write_text(json.dumps(meta))


def test_nerfstudio_scene(tmp_path):
    nerfstudio_scene(tmp_path)
    scene = load_scene(tmp_path, test_every=0, normalize=False)
    assert scene.kind == "nerfstudio" and scene.background == (0.0, 0.0, 0.0)
    assert not scene.random_init
    np.testing.assert_array_equal(scene.points, [[1, 2, 3], [-1, 0.5, 0]])
    np.testing.assert_array_equal(scene.colors, [[10, 20, 30], [200, 100, 0]])
    frames = scene.train
    np.testing.assert_array_equal(frames[0].K, [[30, 0, 16.5], [0, 31, 12], [0, 0, 1]])
    np.testing.assert_array_equal(frames[3].K, [[40, 0, 16.5], [0, 31, 12], [0, 0, 1]])
    assert frames[0].camera_id == frames[1].camera_id != frames[3].camera_id
    # GL camera at (1, 0, 3) looking down -z: the world point (1, 0, 0) is 3 in front of it.
    cam = frames[2].world_to_camera @ [1.0, 0.0, 0.0, 1.0]
    np.testing.assert_allclose(cam[:3], [0, 0, 3])


def test_nerfstudio_opencv_distortion_and_factor_folder(tmp_path):
    nerfstudio_scene(tmp_path, camera_model="OPENCV", k1=-0.05, k2=0.0, p1=0.001, p2=0.0)
    for i in range(4):
        save_png(tmp_path / "images_2" / f"frame_{i:05d}.png", 16, 12)
    frame = load_scene(tmp_path, data_factor=2, test_every=0).train[0]
    assert frame.image_path == tmp_path / "images_2" / "frame_00000.png"
    d = frame.distortion
    assert (d.model, d.params) == ("OPENCV", (-0.05, 0.0, 0.001, 0.0))
    assert (d.fx, d.fy, d.cx, d.cy, d.width, d.height) == (15.0, 15.5, 8.25, 6.0, 16, 12)
    np.testing.assert_array_equal(frame.K, undistorted_camera(d)[0])


def test_nerfstudio_without_points_is_random(tmp_path):
    nerfstudio_scene(tmp_path, with_ply=False)
    scene = load_scene(tmp_path)
    assert scene.random_init and len(scene.points) == RANDOM_INIT_POINTS
    assert np.all(np.isfinite(scene.points))


def test_nerfstudio_unsupported_camera(tmp_path):
    nerfstudio_scene(tmp_path, camera_model="OPENCV_FISHEYE")
    with pytest.raises(ClmError, match=r"transforms\.json: frame 0: camera_model OPENCV_FISHEYE"):
        load_scene(tmp_path)


def test_nerfstudio_negative_focal_length(tmp_path):
    nerfstudio_scene(tmp_path, fl_x=-30.0)
    with pytest.raises(ClmError, match=r"transforms\.json: frame 0: intrinsics fx=-30, fy=31,"):
        load_scene(tmp_path)


def test_nerfstudio_bad_matrix(tmp_path):
    nerfstudio_scene(tmp_path)
    meta = json.loads((tmp_path / "transforms.json").read_text())
    meta["frames"][1]["transform_matrix"] = [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(ClmError, match=r"transforms\.json: frame 1: transform_matrix is not a rot"):
        load_scene(tmp_path)
