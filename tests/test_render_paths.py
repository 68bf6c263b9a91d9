"""clm-render's camera paths, depth maps and comparisons: the path geometry against cameras set
up by hand, depth against Gaussians at known depths, and the command end to end on a tiny run
(videos read back, files written, bad input refused in one line)."""

import itertools
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from plyfile import PlyData, PlyElement

from clm.cli.render import main as render_main
from clm.cli.train import main as train_main
from clm.data.colmap import read_model, write_model
from clm.errors import ClmError
from clm.model.ply import property_names
from clm.render import splats
from clm.render.base import View
from clm.render.camera_file import read_camera_file
from clm.render.camera_path import PoseSpline, interpolate, orbit, order_along_path
from clm.report.video import VideoWriter
from clm.synthetic.generate import generate_scene

FAST = ["--device", "cpu", "--no-progress", "--eval-every", "0"]

# --------------------------------------------------------------------------- hand-made cameras

CENTRE = np.array([1.0, 2.0, 3.0])
UP = np.array([0.0, 0.0, 1.0])


def aimed(position, target, up=UP) -> np.ndarray:
    """World-to-camera (OpenCV) at ``position`` looking at ``target``: rows right, down, forward."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward])
    pose[:3, 3] = -pose[:3, :3] @ position
    return pose


def centre_of(pose: np.ndarray) -> np.ndarray:
    return -pose[:3, :3].T @ pose[:3, 3]


def ring(angles_deg, radius=4.0, height=2.0) -> list[np.ndarray]:
    """Cameras on a horizontal circle around CENTRE, ``height`` above it, looking at it."""
    out = []
    for a in np.radians(angles_deg):
        position = CENTRE + np.array([radius * math.cos(a), radius * math.sin(a), height])
        out.append(aimed(position, CENTRE))
    return out


def assert_rotation(pose: np.ndarray) -> None:
    rot = pose[:3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(rot) == pytest.approx(1.0)


# --------------------------------------------------------------------------- orbit


def test_orbit_looks_at_the_centre_at_the_cameras_radius_and_height():
    # Uneven angles, and two cameras off the typical radius and height: the medians stay.
    cams = ring([10, 50, 130, 200, 290]) + ring([80], radius=9.0) + ring([170], height=7.0)
    frames = orbit(cams, 24)
    assert len(frames) == 24
    for pose in frames:
        assert_rotation(pose)
        c = centre_of(pose)
        to_centre = (CENTRE - c) / np.linalg.norm(CENTRE - c)
        np.testing.assert_allclose(pose[2, :3], to_centre, atol=1e-9)  # forward axis
        assert c[2] - CENTRE[2] == pytest.approx(2.0)  # height above the centre
        assert np.hypot(*(c - CENTRE)[:2]) == pytest.approx(4.0)  # distance from the up axis
        assert abs(pose[0, :3] @ UP) < 1e-9  # no roll: the image x axis is level
        assert -pose[1, :3] @ UP > 0  # image up points up
    # Evenly spaced: every step is the chord of 360/24 degrees.
    steps = [np.linalg.norm(centre_of(a) - centre_of(b)) for a, b in itertools.pairwise(frames)]
    np.testing.assert_allclose(steps, 2 * 4.0 * math.sin(math.pi / 24))
    # It starts at the first camera's bearing.
    np.testing.assert_allclose(centre_of(frames[0]), centre_of(cams[0]), atol=1e-9)


# --------------------------------------------------------------------------- interp


def test_spline_passes_through_every_camera_with_orthonormal_rotations():
    cams = [
        aimed(np.array([0.0, -4.0, 1.0]), CENTRE),
        aimed(np.array([3.0, -3.0, 1.5]), CENTRE),
        aimed(np.array([4.0, 1.0, 0.5]), CENTRE + np.array([0.0, 0.5, 0.0])),
        aimed(np.array([2.0, 5.0, 2.0]), CENTRE),
        aimed(np.array([-1.0, 6.0, 1.0]), np.array([0.0, 0.0, 0.0])),
    ]
    spline = PoseSpline(cams)
    for knot, pose in zip(spline.knots, cams, strict=True):
        np.testing.assert_allclose(spline(knot), pose, atol=1e-9)
    for t in np.linspace(spline.knots[0], spline.knots[-1], 37):
        assert_rotation(spline(t))


def test_spline_halfway_between_two_cameras_is_half_their_turn():
    """Two cameras at the origin and one step along x, the second turned 90 degrees about the
    optical axis: halfway, the position is halfway (a straight line through two points) and the
    camera is turned 45 degrees."""
    first = np.eye(4)
    turn = np.eye(4)
    turn[:3, :3] = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]  # rows: x' = y, y' = -x
    turn[:3, 3] = -turn[:3, :3] @ [1.0, 0.0, 0.0]
    spline = PoseSpline([first, turn])
    half = spline(0.5 * spline.knots[-1])
    np.testing.assert_allclose(centre_of(half), [0.5, 0.0, 0.0], atol=1e-12)
    r = math.sqrt(0.5)
    np.testing.assert_allclose(half[:3, :3], [[r, r, 0], [-r, r, 0], [0, 0, 1]], atol=1e-12)


def test_interp_orders_the_cameras_along_a_path_and_ends_at_the_end_cameras():
    xs = [0.0, 3.0, 1.0, 4.0, 2.0]  # shuffled along a line
    cams = [aimed(np.array([x, -5.0, 0.0]), np.array([x, 0.0, 0.0])) for x in xs]
    order = order_along_path(cams)
    assert [xs[i] for i in order] in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0])
    frames = interpolate(cams, 9)
    ends = {round(centre_of(frames[0])[0], 9), round(centre_of(frames[-1])[0], 9)}
    assert ends == {0.0, 4.0}
    # Along a straight line with evenly spaced cameras, frames are evenly spaced too.
    xs_out = [centre_of(f)[0] for f in frames]
    np.testing.assert_allclose(np.abs(np.diff(xs_out)), 0.5, atol=1e-9)


def test_interp_needs_two_cameras():
    with pytest.raises(ClmError, match="at least 2"):
        interpolate(ring([0]), 10)


# --------------------------------------------------------------------------- camera files


def test_camera_file_layouts(tmp_path):
    default_k = np.array([[50.0, 0, 16], [0, 50.0, 12], [0, 0, 1]])
    ours = tmp_path / "ours.json"
    ours.write_text(
        json.dumps(
            {
                "width": 64,
                "height": 48,
                "cameras": [
                    {"position": [0, 0, -5], "look_at": [0, 0, 0], "up": [0, -1, 0]},
                    {"c2w": np.eye(4)[:3].tolist(), "fov_deg": 90},
                    {"c2w": np.eye(4).ravel().tolist(), "fx": 80, "width": 32, "height": 24},
                ],
            }
        )
    )
    a, b, c = read_camera_file(ours, default_k, (32, 24), UP)
    # Looking from z = -5 towards the origin with -y up is the identity rotation, t = (0, 0, 5).
    np.testing.assert_allclose(a.world_to_camera[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(a.world_to_camera[:3, 3], [0, 0, 5], atol=1e-12)
    np.testing.assert_allclose(a.K, [[100, 0, 32], [0, 100, 24], [0, 0, 1]])  # default K x2
    np.testing.assert_allclose(b.K, [[24, 0, 32], [0, 24, 24], [0, 0, 1]])  # 90 deg: f = h / 2
    assert (c.width, c.height) == (32, 24)
    np.testing.assert_allclose(c.K, [[80, 0, 16], [0, 80, 12], [0, 0, 1]])

    # nerfstudio: OpenGL camera-to-world at (1, 2, 3) with no rotation looks down -z, y up.
    ns = tmp_path / "camera_path.json"
    gl = np.eye(4)
    gl[:3, 3] = [1, 2, 3]
    ns.write_text(
        json.dumps(
            {
                "render_width": 40,
                "render_height": 20,
                "camera_path": [{"camera_to_world": gl.ravel().tolist(), "fov": 90}],
            }
        )
    )
    (cam,) = read_camera_file(ns, default_k, (32, 24), UP)
    np.testing.assert_allclose(cam.world_to_camera[:3, :3], np.diag([1.0, -1.0, -1.0]))
    np.testing.assert_allclose(centre_of(cam.world_to_camera), [1, 2, 3])
    np.testing.assert_allclose(cam.K, [[10, 0, 20], [0, 10, 10], [0, 0, 1]])


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a JSON file"),
        ('{"cameras": []}', "expected a list of cameras"),
        ('[{"fov_deg": 40}]', 'needs "c2w", or "position" and "look_at"'),
        ('[{"c2w": [1, 2, 3]}]', "4x4 or 3x4"),
        ('[{"c2w": [[2,0,0,0],[0,1,0,0],[0,0,1,0]]}]', "not a rotation"),
        ('[{"position": [0,0,0], "look_at": [0,0,1], "fov_deg": 200}]', "not in (0, 180)"),
    ],
)
def test_bad_camera_files_are_refused(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ClmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_camera_file(bad, np.eye(3), (8, 6), UP)


# --------------------------------------------------------------------------- depth


def gaussians(zs, opacities, log_scale=-1.0):
    """Gaussians on the optical axis of the identity camera at depths ``zs``, round, grey."""
    n = len(zs)
    return {
        "means": torch.tensor([[0.0, 0.0, z] for z in zs]),
        "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]] * n),
        "scales": torch.full((n, 3), log_scale),
        "opacities": torch.logit(torch.tensor(opacities)),
        "sh0": torch.zeros(n, 1, 3),
        "shN": torch.zeros(n, 15, 3),
    }


# 33 x 25 with the principal point at (16.5, 12.5): the axis hits the centre of pixel (16, 12).
VIEW = View(torch.eye(4), torch.tensor([[40.0, 0, 16.5], [0, 40.0, 12.5], [0, 0, 1]]), 33, 25)


@pytest.fixture(params=["native", "torch"])
def rasterizer(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(splats.native_raster, "usable", lambda *t: False)
    elif not splats.native_raster.usable():
        pytest.skip("no C compiler for the native rasterizer")
    return request.param


def test_depth_of_one_gaussian_is_its_z_at_its_centre(rasterizer):
    out = splats.render_torch(gaussians([5.0], [0.9]), VIEW, 0, torch.ones(3), depth=True)
    rgb, depth = splats.split_depth(out.image)
    assert depth[12, 16] == pytest.approx(5.0, rel=1e-6)
    assert out.alpha[12, 16, 0] == pytest.approx(0.9, rel=1e-6)  # on its centre alpha = opacity
    assert depth[0, 0] == 0 and out.alpha[0, 0, 0] == 0  # nothing drawn in the corner
    # The colours are those of the render without depth.
    plain = splats.render_torch(gaussians([5.0], [0.9]), VIEW, 0, torch.ones(3))
    torch.testing.assert_close(rgb, plain.image, rtol=0, atol=0)


def test_depth_of_two_gaussians_is_their_alpha_weighted_mean(rasterizer):
    """In front z = 2 with alpha 0.6, behind z = 6 with alpha 0.5: weights 0.6 and
    0.5 x (1 - 0.6) = 0.2, so the expected depth is (0.6 x 2 + 0.2 x 6) / 0.8 = 3."""
    params = gaussians([6.0, 2.0], [0.5, 0.6])
    params["scales"] = torch.log(torch.tensor([[0.6] * 3, [0.2] * 3]))  # the same size on screen
    out = splats.render_torch(params, VIEW, 0, torch.zeros(3), depth=True)
    assert out.image[12, 16, 3] == pytest.approx(3.0, rel=1e-5)
    assert out.alpha[12, 16, 0] == pytest.approx(0.8, rel=1e-5)


@pytest.mark.gpu
def test_gsplat_depth_matches_the_cpu_depth():
    """gsplat's RGB+ED against the CPU renderer's depth channel, on the two-splat case."""
    params = gaussians([6.0, 2.0], [0.5, 0.6])
    cpu = splats.render_torch(params, VIEW, 0, torch.zeros(3), depth=True)
    cuda = torch.device("cuda")
    gpu = splats.render_gsplat(
        {k: v.to(cuda) for k, v in params.items()}, VIEW.to(cuda), 0, torch.zeros(3, device=cuda),
        depth=True,
    )  # fmt: skip
    assert gpu.image[12, 16, 3].item() == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(gpu.alpha.cpu(), cpu.alpha, atol=2e-3, rtol=1e-3)
    # (a splat at the 1/255 cut-off in one and not the other moves a pixel's depth a little)
    torch.testing.assert_close(gpu.image.cpu(), cpu.image, atol=2e-2, rtol=1e-3)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny COLMAP scene (32 x 24 images) and a finished two-step run on it."""
    root = tmp_path_factory.mktemp("paths")
    size = {"images": 8, "width": 32, "height": 24}
    scene = generate_scene(root / "scene", "tiny", **size, device="cpu", progress=False)
    out = root / "run"
    assert train_main([str(scene), "--output", str(out), "--steps", "2", *FAST]) == 0
    return scene, out


def render(*args) -> int:
    return render_main([*map(str, args), "--device", "cpu"])


def test_orbit_video_reads_back_with_its_frames_and_size(run, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio

    _, out = run
    video = tmp_path / "orbit.mp4"
    args = ["--path", "orbit", "--frames", 7, "--width", 48, "--depth", "--output", video]
    assert render(out, *args) == 0
    assert render(out, "--path", "interp", "--frames", 5, "--output", tmp_path / "i.mp4") == 0
    expected = {"orbit.mp4": (7, 36), "orbit_depth.mp4": (7, 36), "i.mp4": (5, 24)}
    for name, (count, height) in expected.items():
        with imageio.get_reader(tmp_path / name) as reader:
            shapes = [frame.shape for frame in reader]
        assert shapes == [(height, height * 4 // 3, 3)] * count, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)  # no partial files


def test_path_to_a_folder_writes_frames_and_depth(run, tmp_path):
    _, out = run
    folder = tmp_path / "frames"
    assert render(out, "--path", "interp", "--frames", 4, "--depth", "--output", folder) == 0
    assert sorted(p.name for p in folder.glob("*.png")) == [
        f"frame_{i:05d}{kind}.png" for i in range(4) for kind in ("", "_depth")
    ]
    depth = np.load(folder / "frame_00002_depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (24, 32)
    assert np.asarray(Image.open(folder / "frame_00002_depth.png")).shape == (24, 32, 3)


def one_splat_ply(path, position, log_scale):
    names = property_names(0)
    vertex = np.zeros(1, dtype=[(n, "f4") for n in names])
    vertex["x"], vertex["y"], vertex["z"] = position
    vertex["opacity"] = 5.0
    vertex["rot_0"] = 1.0
    for i in range(3):
        vertex[f"scale_{i}"] = log_scale
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    return path


def test_depth_from_a_camera_file_is_in_the_scenes_units(run, tmp_path):
    """One splat at a known point of the scene's frame, seen from 7 units away by a camera of
    the file: its depth file says 7 at the centre pixel, whatever scale training used."""
    scene, _ = run
    point = np.array([0.3, -0.2, 1.5])
    ply = one_splat_ply(tmp_path / "one.ply", point, math.log(0.3))
    cams = tmp_path / "cams.json"
    eye = point + 7.0 * np.array([0.6, 0.0, 0.8])
    entry = {"position": eye.tolist(), "look_at": point.tolist(), "up": [0, 0, 1], "fov_deg": 40}
    cams.write_text(json.dumps({"width": 33, "height": 25, "cameras": [entry]}))
    folder = tmp_path / "f"
    args = [ply, "--scene", scene, "--path", cams, "--depth", "--output", folder]
    assert render(*args) == 0
    depth = np.load(folder / "frame_00000_depth.npy")
    assert depth[12, 16] == pytest.approx(7.0, rel=1e-4)
    assert depth[0, 0] == 0


def test_compare_puts_truth_render_and_error_side_by_side(run, tmp_path):
    _, out = run
    folder = tmp_path / "cmp"
    assert render(out, "--split", "test", "--compare", "--depth", "--output", folder) == 0
    (plain,) = [p for p in folder.glob("*.png") if (folder / f"{p.stem}_compare.png").exists()]
    stem = plain.stem
    render_png = np.asarray(Image.open(plain))
    side = np.asarray(Image.open(folder / f"{stem}_compare.png"))
    assert side.shape == (24, 96, 3)
    np.testing.assert_array_equal(side[:, 32:64], render_png)
    assert (folder / f"{stem}_depth.npy").is_file() and (folder / f"{stem}_depth.png").is_file()


def one_camera_scene(scene, dst):
    """A copy of ``scene`` with only its first image."""
    shutil.copytree(scene, dst)
    model = read_model(dst / "sparse" / "0")
    first = min(model.images)
    model.images = {first: model.images[first]}
    write_model(dst / "sparse" / "0", model)
    return dst


def interp_one_camera(tmp, scene):
    return ["--path", "interp", "--scene", one_camera_scene(scene, tmp / "one"), "--test-every", 0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda t, s: ["--path", t / "nosuch.json"], "nosuch.json: camera path file not found"),
        (lambda t, s: ["--path", "orbit", "--frames", "0"], "--frames: must be at least 1"),
        (interp_one_camera, "needs at least 2 training cameras, the scene has 1"),
        (lambda t, s: ["--path", "orbit", "--compare"], "--compare needs ground truth"),
        (lambda t, s: ["--frames", "5"], "--frames applies to --path renders"),
        (lambda t, s: ["--output", t / "x.mp4"], "a video needs --path"),
    ],
    ids=["no-file", "zero-frames", "interp-one-camera", "compare-path", "frames-no-path", "video"],
)
def test_bad_input_is_refused_in_one_line(run, tmp_path, capsys, argv, message):
    scene, out = run
    capsys.readouterr()
    assert render(out, *argv(tmp_path, scene)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_a_video_without_the_extra_says_how_to_install_it(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if absent
    with pytest.raises(ClmError, match=r"pip install clm\[video\]"):
        VideoWriter(tmp_path / "v.mp4", 30)
    _, out = run
    capsys.readouterr()
    assert render(out, "--path", "orbit", "--output", tmp_path / "v.mp4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: writing a video needs imageio and imageio-ffmpeg: pip install clm[video]"
    ]
