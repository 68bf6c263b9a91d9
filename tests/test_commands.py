"""clm-export, clm-render and clm-eval on a finished run, and a PLY taken back into training."""

import json

import numpy as np
import pytest

from clm.cli.evaluate import main as eval_main
from clm.cli.export import main as export_main
from clm.cli.render import main as render_main
from clm.cli.train import main as train_main
from clm.model.ply import read_ply
from clm.synthetic.generate import generate_scene

FAST = ["--device", "cpu", "--no-progress", "--eval-every", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmds")
    size = {"images": 16, "width": 64, "height": 48}
    scene = generate_scene(root / "scene", "tiny", **size, device="cpu", progress=False)
    out = root / "run"
    assert train_main([str(scene), "--output", str(out), "--steps", "30", *FAST]) == 0
    return scene, out


def test_export_reproduces_the_runs_ply(run, tmp_path):
    _, out = run
    assert export_main([str(out), "--output", str(tmp_path / "again.ply")]) == 0
    a, b = read_ply(out / "point_cloud.ply"), read_ply(tmp_path / "again.ply")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_render_and_eval_from_the_run_and_from_its_ply(run, tmp_path):
    scene, out = run
    assert render_main([str(out), "--output", str(tmp_path / "r"), "--device", "cpu"]) == 0
    assert len(list((tmp_path / "r").glob("*.png"))) == 2
    assert eval_main([str(out), "--output", str(tmp_path / "m1.json"), "--device", "cpu"]) == 0
    ply = str(out / "point_cloud.ply")
    args = [ply, "--scene", str(scene), "--output", str(tmp_path / "m2.json"), "--device", "cpu"]
    assert eval_main(args) == 0
    from_run = json.loads((tmp_path / "m1.json").read_text())
    from_ply = json.loads((tmp_path / "m2.json").read_text())
    # The PLY is the run's model in the scene's frame: it renders the same held-out views.
    assert from_ply["psnr"] == pytest.approx(from_run["psnr"], abs=1e-3)
    assert from_run["psnr"] == pytest.approx(json.loads((out / "metrics.json").read_text())["psnr"])


def test_a_ply_without_scene_is_refused(run, capsys):
    _, out = run
    assert eval_main([str(out / "point_cloud.ply"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scene" in err[0]


def test_training_continues_from_a_ply(run, tmp_path):
    scene, out = run
    ply = out / "point_cloud.ply"
    new = tmp_path / "cont"
    args = [str(scene), "--output", str(new), "--init-ply", str(ply), "--steps", "5", *FAST]
    assert train_main([*args, "--densify-start", "1000"]) == 0
    before, after = read_ply(ply), read_ply(new / "point_cloud.ply")
    assert after["means"].shape == before["means"].shape
    moved = np.abs(after["means"] - before["means"]).max()
    assert 0 < moved < 0.05 * np.ptp(before["means"], axis=0).max()
