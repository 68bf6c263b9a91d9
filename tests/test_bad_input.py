"""Bad input and resume mistakes, end to end through clm-train: each ends in one ``error:`` line
with a non-zero exit and leaves no output folder behind, or is handled correctly and says so."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData, PlyElement
from test_scene_loading import blender_scene, nerfstudio_scene

from clm.cli.evaluate import main as eval_main
from clm.cli.render import main as render_main
from clm.cli.train import main as train_main
from clm.data.colmap import read_model, write_model
from clm.data.scene import load_scene
from clm.errors import ClmError
from clm.model.ply import property_names
from clm.synthetic.generate import generate_scene
from clm.train.checkpoint import list_checkpoints

FAST = ["--device", "cpu", "--no-progress", "--eval-every", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny COLMAP scene and a finished two-step run on it."""
    root = tmp_path_factory.mktemp("bad_input")
    size = {"images": 8, "width": 32, "height": 24}
    scene = generate_scene(root / "scene", "tiny", **size, device="cpu", progress=False)
    run = root / "run"
    assert train_main([str(scene), "--output", str(run), "--steps", "2", *FAST]) == 0
    return scene, run


def with_points(scene: Path, dst: Path, edit) -> Path:
    """A copy of ``scene`` whose COLMAP points pass through ``edit(xyz)`` (in place)."""
    shutil.copytree(scene, dst)
    model = read_model(dst / "sparse" / "0")
    edit(model.points.xyz)
    write_model(dst / "sparse" / "0", model)
    return dst


def moved_cameras(scene: Path, dst: Path) -> Path:
    """A copy of ``scene`` with every camera twice as far from the origin: another frame."""
    shutil.copytree(scene, dst)
    model = read_model(dst / "sparse" / "0")
    for image in model.images.values():
        image.tvec = 2.0 * image.tvec
    write_model(dst / "sparse" / "0", model)
    return dst


def splat_ply(path: Path, rows: np.ndarray) -> Path:
    """A degree-0 3DGS PLY of the given rows, written as they are (NaN included)."""
    names = property_names(0)
    vertex = np.zeros(len(rows), dtype=[(n, "f4") for n in names])
    for i, name in enumerate(names):
        vertex[name] = rows[:, i]
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    return path


def unit_rows(n: int) -> np.ndarray:
    rows = np.zeros((n, len(property_names(0))), np.float32)
    rows[:, :3] = np.random.default_rng(0).normal(size=(n, 3))
    rows[:, -4] = 1.0  # identity quaternion
    return rows


def nan_rows(n: int) -> np.ndarray:
    return np.full((n, len(property_names(0))), np.nan, np.float32)


def one_inf_row(n: int) -> np.ndarray:
    rows = unit_rows(n)
    rows[7, 11] = np.inf
    return rows


def fresh(flags: list[str], steps: int = 2):
    """argv for a fresh run on the tiny scene."""
    return lambda scene, run, tmp: [str(scene), *flags, "--steps", str(steps)]


def init_ply(rows):
    return lambda scene, run, tmp: [
        str(scene),
        "--init-ply",
        str(splat_ply(tmp / "init.ply", rows(40))),
        "--steps",
        "2",
    ]


def all_nan_points(scene, run, tmp):
    bad = with_points(scene, tmp / "nan_scene", lambda xyz: xyz.fill(np.nan))
    return [str(bad), "--steps", "2"]


def resume(flags: list[str], scene_of=None):
    """argv resuming a copy of the base run (made as the output), with ``flags``."""

    def argv(scene, run, tmp):
        shutil.copytree(run, tmp / "out")
        where = [] if scene_of is None else [str(scene_of(scene, tmp))]
        return [*where, "--resume", *flags, "--steps", "3"]

    return argv


REFUSED = [
    pytest.param(all_nan_points, "none of its", id="points3D-all-nan"),
    pytest.param(init_ply(nan_rows), "Gaussian 0 holds NaN", id="init-ply-all-nan"),
    pytest.param(init_ply(one_inf_row), "Gaussian 7 holds NaN", id="init-ply-one-inf"),
    pytest.param(init_ply(lambda n: unit_rows(0)), "holds no Gaussians", id="init-ply-empty"),
    pytest.param(fresh(["--cpu-threads", "0"]), "--cpu-threads must be", id="cpu-threads-0"),
    pytest.param(fresh(["--max-gpu-gb", "nan"]), "--max-gpu-gb must be a finite", id="gpu-nan"),
    pytest.param(fresh(["--max-gpu-gb", "inf"]), "--max-gpu-gb must be a finite", id="gpu-inf"),
    pytest.param(fresh(["--max-host-gb", "nan"]), "--max-host-gb must be", id="host-nan"),
    pytest.param(fresh(["--ssim-weight", "nan"]), "--ssim-weight must be", id="ssim-nan"),
    pytest.param(fresh(["--grad-threshold", "inf"]), "--grad-threshold must", id="grad-inf"),
    pytest.param(fresh(["--max-seconds", "nan"]), "--max-seconds must be", id="seconds-nan"),
    pytest.param(fresh(["--max-seconds", "-1"]), "--max-seconds must be", id="seconds-neg"),
    pytest.param(fresh(["--method", "4dgs"]), "invalid choice: '4dgs'", id="method-unknown"),
    pytest.param(
        fresh(["--method-option", "normal_weight"]), "want NAME=VALUE", id="method-option-form"
    ),
    pytest.param(
        fresh(["--method", "2dgs", "--method-option", "colour=1"]),
        "method 2dgs has no option 'colour'",
        id="method-option-unknown",
    ),
    pytest.param(
        fresh(["--method", "2dgs", "--method-option", "normal_from=soon"]),
        "normal_from: 'soon' is not a valid int",
        id="method-option-type",
    ),
    pytest.param(
        lambda scene, run, tmp: [*init_ply(unit_rows)(scene, run, tmp), "--method", "2dgs"],
        "the file's scales has shape (3,); 2dgs wants (2,)",
        id="init-ply-of-another-method",
    ),
    pytest.param(resume(["--method", "2dgs"]), "--method 3dgs;", id="resume-method"),
    pytest.param(resume(["--batch-size", "2"]), "--batch-size 1;", id="resume-batch-size"),
    pytest.param(resume(["--sh-degree", "1"]), "--sh-degree 3;", id="resume-sh-degree"),
    pytest.param(resume(["--test-every", "2"]), "--test-every 8;", id="resume-test-every"),
    pytest.param(
        resume([], lambda scene, tmp: moved_cameras(scene, tmp / "other")),
        "is not the scene this run trained on",
        id="resume-other-scene",
    ),
]


@pytest.mark.parametrize("make_argv, message", REFUSED)
def test_refused_in_one_line(base, tmp_path, capsys, make_argv, message):
    scene, run = base
    out = tmp_path / "out"
    argv = make_argv(scene, run, tmp_path)
    resuming = "--resume" in argv
    capsys.readouterr()
    assert train_main([*argv, "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]] and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert resuming or not out.exists()  # a failed fresh run leaves no folder behind


@pytest.mark.parametrize("command", [render_main, eval_main], ids=["render", "eval"])
def test_render_and_eval_refuse_an_all_nan_ply(base, tmp_path, capsys, command):
    scene, _ = base
    ply = splat_ply(tmp_path / "nan.ply", nan_rows(10))
    args = [str(ply), "--scene", str(scene), "--output", str(tmp_path / "o"), "--device", "cpu"]
    assert command(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "Gaussian 0 holds NaN" in err[-1], err


def test_non_finite_points_are_dropped_with_a_count(base, tmp_path, capsys):
    scene, _ = base

    def spoil(xyz):
        xyz[[0, 5, 9]] = [np.nan, np.inf, -np.inf]

    bad = with_points(scene, tmp_path / "scene", spoil)
    total = len(read_model(bad / "sparse" / "0").points)
    args = [str(bad), "--output", str(tmp_path / "out"), "--steps", "1", *FAST]
    assert train_main(args) == 0
    err = capsys.readouterr().err
    assert f"dropped 3 of {total} points with NaN or infinite coordinates" in err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_gaussians"] == total - 3


def test_resume_accepts_the_same_options_and_the_scene_moved(base, tmp_path, capsys):
    scene, run = base
    out = tmp_path / "out"
    shutil.copytree(run, out)
    moved = shutil.copytree(scene, tmp_path / "moved")
    args = [str(moved), "--resume", "--output", str(out), "--steps", "3", *FAST]
    assert train_main([*args, "--sh-degree", "3", "--batch-size", "1"]) == 0
    assert "at a new path" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["step"] == 3


def test_non_finite_points_of_a_nerfstudio_ply(tmp_path, caplog):
    nerfstudio_scene(tmp_path)

    def points(xyz):
        vertex = np.array([tuple(p) for p in xyz], dtype=[(c, "f4") for c in "xyz"])
        PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "points.ply"))

    points([[np.nan, 0, 0], [-1, 0.5, 0]])
    scene = load_scene(tmp_path, test_every=0, normalize=False)
    np.testing.assert_array_equal(scene.points, [[-1, 0.5, 0]])
    assert "dropped 1 of 2 points" in caplog.text
    points([[np.nan, 0, 0], [-1, np.inf, 0]])
    with pytest.raises(ClmError, match=r"\(ply_file_path\): none of its 2 points has finite"):
        load_scene(tmp_path)


def ngp_scene(root: Path) -> float:
    """An instant-ngp transforms.json: one file, camera_angle_x, no fl_x; returns the angle."""
    nerfstudio_scene(root)
    meta = json.loads((root / "transforms.json").read_text())
    for key in ("fl_x", "fl_y", "cx", "cy"):
        meta.pop(key)
        meta["frames"][3].pop(key, None)
    meta["camera_angle_x"] = 0.9
    (root / "transforms.json").write_text(json.dumps(meta))
    return 0.9


def test_instant_ngp_transforms(tmp_path, capsys):
    angle = ngp_scene(tmp_path / "scene")
    frame = load_scene(tmp_path / "scene", test_every=0).train[0]
    focal = 0.5 * 32 / math.tan(0.5 * angle)
    np.testing.assert_allclose(frame.K, [[focal, 0, 16], [0, focal, 12], [0, 0, 1]])
    args = [str(tmp_path / "scene"), "--output", str(tmp_path / "out"), "--steps", "1", *FAST]
    assert train_main(args) == 0


def test_blender_without_a_test_file_says_so(tmp_path, capsys):
    blender_scene(tmp_path / "scene")
    (tmp_path / "scene" / "transforms_test.json").unlink()
    args = [str(tmp_path / "scene"), "--output", str(tmp_path / "out"), "--steps", "1", *FAST]
    assert train_main(args) == 0
    err = capsys.readouterr().err
    assert "no transforms_test.json, so no held-out images" in err
    assert "random Gaussians" in err
    assert "--test-every" not in err


def test_max_seconds_stops_early(base, tmp_path):
    scene, _ = base
    args = [str(scene), "--output", str(tmp_path / "out"), "--steps", "1000", *FAST]
    assert train_main([*args, "--max-seconds", "0.01"]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["step"] == 1


def test_help_shows_each_default_once_and_the_presets_values(capsys):
    assert train_main(["--preset", "tiny", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "30000 / batch size) (preset tiny: 1500)" in text
    assert "(default: 1000) (preset tiny: 500)" in text  # --checkpoint-every
    assert text.count("(default: 10)") == 1 and "(preset tiny: 10)" not in text  # --log-every


def test_zero_intervals_mean_never(base, tmp_path):
    scene, _ = base
    out = tmp_path / "out"
    args = [str(scene), "--output", str(out), "--steps", "4", *FAST]
    assert train_main([*args, "--checkpoint-every", "0", "--log-every", "0"]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_0000004.ckpt"]  # the final one
    rows = (out / "train_log.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("4,")  # the header and the last step only
