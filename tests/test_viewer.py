"""The live viewer without a browser: viser's camera as a clm View, a frame at the requested size,
pacing, and training with the viewer on (which must not change what is trained)."""

import contextlib
import math
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clm.api import create_engine
from clm.cli.train import main as train_main
from clm.cli.view import main as view_main
from clm.model.init import init_from_points
from clm.model.ply import read_ply
from clm.model.spec import gaussian_splatting_spec
from clm.render.camera_path import look_at
from clm.render.splats import default_renderer
from clm.synthetic.generate import generate_scene
from clm.train.config import make_config
from clm.train.trainer import Trainer
from clm.viewer.camera import ViewerCamera, camera_to_view, frame_size, start_pose
from clm.viewer.render import render_frame
from clm.viewer.server import Viewer

FAST = ["--device", "cpu", "--no-progress", "--eval-every", "0"]


def project(view, point):
    """Pixel (u, v) of a world point, and its depth."""
    p = view.viewmat.double() @ torch.tensor([*point, 1.0], dtype=torch.float64)
    uvw = view.K.double() @ p[:3]
    return (uvw[:2] / uvw[2]).tolist(), float(p[2])


def test_a_camera_looking_along_z_worked_by_hand():
    # Identity rotation: the camera's axes are the world's (x right, y down, z forward). At
    # (0, 0, -5) with a 90-degree vertical view on a 200 x 100 canvas, f = 50 / tan(45) = 50.
    camera = ViewerCamera((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -5.0), math.pi / 2, 200, 100)
    view = camera_to_view(camera, (200, 100))
    (u, v), depth = project(view, (0.0, 0.0, 0.0))
    assert (u, v, depth) == pytest.approx((100.0, 50.0, 5.0))
    assert project(view, (1.0, 0.0, 0.0))[0] == pytest.approx([110.0, 50.0])  # right
    assert project(view, (0.0, 1.0, 0.0))[0] == pytest.approx([100.0, 60.0])  # below


def test_a_camera_turned_about_y_worked_by_hand():
    # 90 degrees about world y: wxyz = (cos 45, 0, sin 45, 0) takes the camera's z (forward) to
    # world +x and its x (right) to world -z. At (-5, 0, 0) it faces the origin.
    half = math.sqrt(0.5)
    camera = ViewerCamera((half, 0.0, half, 0.0), (-5.0, 0.0, 0.0), math.pi / 2, 200, 100)
    view = camera_to_view(camera, (200, 100))
    (u, v), depth = project(view, (0.0, 0.0, 0.0))
    assert (u, v, depth) == pytest.approx((100.0, 50.0, 5.0))
    assert project(view, (0.0, 0.0, -1.0))[0] == pytest.approx([110.0, 50.0])


def test_the_camera_viser_reports_from_a_browser():
    # What viser 1.1.1's page sent from headless Chromium for its default camera: at (3, 3, 3),
    # looking at the origin, world +z up.
    wxyz = (-0.1759199, 0.33985114, 0.82047324, -0.4247082)
    camera = ViewerCamera(wxyz, (3.0, 3.0, 3.0), 1.3089969389957472, 800, 513)
    view = camera_to_view(camera, (400, 256))
    (u, v), depth = project(view, (0.0, 0.0, 0.0))
    assert (u, v) == pytest.approx((200.0, 128.0), abs=1e-4)
    assert depth == pytest.approx(math.sqrt(27.0), rel=1e-6)
    (u_up, v_up), _ = project(view, (0.0, 0.0, 1.0))
    assert u_up == pytest.approx(200.0, abs=1e-4) and v_up < 128.0  # up is up on screen


def test_a_camera_made_by_viser_looking_at_a_point():
    tf = pytest.importorskip("viser.transforms")
    position, target, up = (
        np.array([1.0, 2.0, 0.5]),
        np.array([-2.0, 0.0, 1.0]),
        np.array([0, 0, 1]),
    )
    forward = (target - position) / np.linalg.norm(target - position)
    down = -(up - (up @ forward) * forward)
    down /= np.linalg.norm(down)
    rotation = np.stack([np.cross(down, forward), down, forward], axis=1)  # columns x, y, z
    wxyz = tuple(tf.SO3.from_matrix(rotation).wxyz)
    camera = ViewerCamera(wxyz, tuple(position), 0.8, 640, 480)
    view = camera_to_view(camera, (640, 480))
    (u, v), depth = project(view, target)
    assert (u, v) == pytest.approx((320.0, 240.0), abs=1e-3)
    assert depth == pytest.approx(np.linalg.norm(target - position), rel=1e-6)
    assert project(view, target + up)[0][1] < 240.0


def test_the_start_pose_is_the_first_training_camera():
    rng = np.random.default_rng(0)
    poses = []
    for angle in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        position = np.array([4 * np.cos(angle), 4 * np.sin(angle), 1.0]) + rng.normal(0, 0.01, 3)
        poses.append(look_at(position, np.zeros(3), np.array([0.0, 0.0, 1.0])))
    K = np.array([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]])
    pose = start_pose(poses, K, 96)
    assert pose.position == pytest.approx(-poses[0][:3, :3].T @ poses[0][:3, 3])
    forward = (pose.look_at - pose.position) / np.linalg.norm(pose.look_at - pose.position)
    assert forward == pytest.approx(poses[0][2, :3])
    assert pose.up == pytest.approx([0, 0, 1], abs=0.02)
    assert pose.fov == pytest.approx(2 * math.atan(48 / 100))


def test_frame_size_keeps_the_canvas_aspect_within_the_limits():
    assert frame_size(1600, 900, 512, None) == (512, 288)
    assert frame_size(300, 200, 512, None) == (300, 200)  # never upscaled
    w, h = frame_size(1600, 900, 4096, 64 * 48)
    assert w * h <= 64 * 48 and abs(w / h - 16 / 9) < 0.05


@pytest.fixture(scope="module")
def engine():
    rng = np.random.default_rng(1)
    points = rng.uniform(-1, 1, size=(400, 3))
    colors = rng.integers(0, 256, size=(400, 3), dtype=np.uint8)
    spec = gaussian_splatting_spec(0)
    params = init_from_points(spec, points, colors, init_opacity=0.5)
    cpu = torch.device("cpu")
    eng = create_engine(
        spec, params, default_renderer(cpu), total_steps=1, offload="none", device=cpu
    )
    yield eng
    eng.close()


def test_a_render_request_returns_an_image_of_the_requested_size(engine):
    camera = ViewerCamera((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -4.0), 0.9, 640, 480)
    image = render_frame(engine, camera, 0, torch.zeros(3), max_side=160)
    assert image.shape == (120, 160, 3) and image.dtype == np.uint8
    assert image[50:70, 70:90].mean() > 10  # the Gaussians in front of it were drawn
    small = render_frame(engine, camera, 0, torch.zeros(3), max_side=160, max_pixels=40 * 30)
    assert small.shape == (30, 40, 3)


class FakeBrowser:
    """What the viewer uses of a viser client: its id, camera and scene."""

    def __init__(self, client_id, camera):
        self.client_id = client_id
        self.frames = []
        self.atomic = contextlib.nullcontext
        handle = SimpleNamespace(
            client=self,
            wxyz=np.array(camera.wxyz),
            position=np.array(camera.position),
            fov=camera.fov,
            image_width=camera.width,
            image_height=camera.height,
            on_update=lambda callback: None,
        )
        self.camera = handle
        self.scene = SimpleNamespace(
            set_background_image=lambda image, **kw: self.frames.append(image)
        )


CAMERA = ViewerCamera((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -4.0), 0.9, 64, 48)


def test_frames_are_paced_and_sent_only_when_something_changed():
    viewer = Viewer("test", 0, fps=1000.0, share=0.2, max_side=64)
    try:
        browser = FakeBrowser(1, CAMERA)
        viewer._connect(browser)

        def slow_render(camera, max_side):
            time.sleep(0.05)
            return np.zeros((camera.height, camera.width, 3), np.uint8)

        assert viewer.draw_due(slow_render, model_version=0)
        assert len(browser.frames) == 1 and browser.frames[0].shape == (48, 64, 3)
        # A frame of 50 ms at a share of 0.2 is followed by at least 200 ms without one.
        assert not viewer.draw_due(slow_render, model_version=1)
        time.sleep(0.25)
        assert viewer.draw_due(slow_render, model_version=1)
        time.sleep(0.25)
        assert not viewer.draw_due(slow_render, model_version=1)  # nothing changed
        viewer._record(browser.camera)  # the browser's camera moved
        assert viewer.draw_due(slow_render, model_version=1)
        assert len(browser.frames) == 3
    finally:
        viewer.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer_scene")
    size = {"images": 8, "width": 48, "height": 32}
    return generate_scene(root, "tiny", **size, device="cpu", progress=False)


def train_config(scene, output, **extra):
    given = {
        "scene": scene,
        "output": output,
        "preset": "tiny",
        "device": "cpu",
        "steps": 3,
        "progress": False,
        "eval_every": 0,
        "checkpoint_every": 0,
        **extra,
    }
    return make_config(given)


def test_training_with_the_viewer_draws_frames_and_trains_the_same(scene, tmp_path, monkeypatch):
    served = []
    monkeypatch.setattr(Viewer, "serve", lambda self, render, version: served.append(version))
    trainer = Trainer(
        train_config(scene, tmp_path / "with", viewer=True, viewer_port=0, viewer_fps=1e3)
    )
    try:
        (viewer_hook,) = trainer.hooks
        browser = FakeBrowser(7, CAMERA)
        viewer_hook.viewer._connect(browser)
        trainer.run()
    finally:
        trainer.close()
    assert browser.frames and browser.frames[-1].shape == (48, 64, 3)
    # A browser open before the scene loaded was moved to the first training camera.
    first = trainer.scene.train[0]
    assert browser.camera.position == pytest.approx(first.camera_center)
    assert served == [3]  # after training it serves the final model (until Ctrl-C)
    trainer = Trainer(train_config(scene, tmp_path / "without"))
    try:
        trainer.run()
    finally:
        trainer.close()
    with_viewer, without = (read_ply(tmp_path / d / "point_cloud.ply") for d in ("with", "without"))
    for key in without:
        np.testing.assert_array_equal(with_viewer[key], without[key])


def test_the_viewer_is_not_taken_over_by_resume():
    base = {"viewer": True, "viewer_port": 9000, "tensorboard": True, "scene": "s", "steps": 5}
    cfg = make_config({"resume": True}, base=base)
    assert not cfg.viewer and cfg.viewer_port == 8080 and cfg.tensorboard


@pytest.mark.parametrize("command", ["train", "view"])
def test_without_viser_one_error_line(scene, tmp_path, monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "viser", None)  # import viser raises ImportError
    if command == "train":
        code = train_main([str(scene), "--output", str(tmp_path / "run"), "--viewer", *FAST])
        assert not (tmp_path / "run").exists()
    else:
        code = view_main([str(tmp_path / "no.ply"), "--scene", str(scene)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "pip install clm[viewer]" in err[0]


@pytest.mark.parametrize(
    "flags, message",
    [(["--viewer-fps", "0"], "--viewer-fps"), (["--viewer-port", "70000"], "--viewer-port")],
)
def test_bad_viewer_options_give_one_error_line(scene, tmp_path, capsys, flags, message):
    code = train_main([str(scene), "--output", str(tmp_path / "run"), "--viewer", *flags, *FAST])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
