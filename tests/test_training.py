"""Training end to end on the CPU: resume after Ctrl-C, the PLY's frame, density control, bad
input at the command line, and the quality a short run reaches."""

import json
import math
import os
import signal
import struct

import numpy as np
import pytest
import torch

from clm.cli.train import main as train_main
from clm.data.colmap import read_model
from clm.engine.resident import ResidentEngine
from clm.methods.gaussians import GaussianSplatting
from clm.model.ply import read_ply
from clm.model.spec import gaussian_splatting_spec
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.render.splats import render_torch
from clm.synthetic.generate import generate_scene
from clm.train import engine_factory
from clm.train.checkpoint import MOMENT_KINDS, Checkpoint, list_checkpoints
from clm.train.checkpoint_source import checkpoint_source
from clm.train.config import make_config
from clm.train.densify import DensifyConfig, DensityController
from clm.train.trainer import Interrupted, Trainer

FAST = ["--device", "cpu", "--no-progress", "--log-every", "5", "--eval-every", "0"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    size = {"images": 16, "width": 64, "height": 48}
    return generate_scene(root, "tiny", **size, device="cpu", progress=False)


def short_config(scene, output, offload, **extra):
    given = {
        "scene": scene,
        "output": output,
        "preset": "tiny",
        "device": "cpu",
        "offload": offload,
        "steps": 40,
        "batch_size": 2,
        "densify_start": 10,
        "densify_every": 20,
        "densify_stop": 70,
        "opacity_reset_every": 60,
        "sh_degree_every": 20,
        "checkpoint_every": 20,
        "progress": False,
        "eval_every": 0,
    }
    given.update(extra)
    return make_config(given)


def getattr_kind(chunk, kind):
    """A RowChunk's parameters or one of its moments, by checkpoint kind."""
    return {"param": chunk.params, "exp_avg": chunk.exp_avg, "exp_avg_sq": chunk.exp_avg_sq}[kind]


def final_params(output):
    """The newest checkpoint's columns, joined: {kind: {attribute: tensor}}."""
    ckpt = Checkpoint(list_checkpoints(output)[-1])
    blocks = list(ckpt.blocks())
    out = {}
    for column in ckpt.columns:
        kind, name = column.split("/", 1)
        out.setdefault(kind, {})[name] = torch.cat([b[column] for b in blocks])
    return out


def walk_always_on_gpu(spec, cfg, device, render_fn, plans):
    """The engine factory's choice made as on a GPU whose budget holds the rotations."""
    promoted = spec.with_key(["quats"])
    return promoted, plans(promoted)


@pytest.mark.parametrize(
    ("offload", "stop", "method", "rotations_key"),
    [
        ("none", 11, "3dgs", False),
        ("naive", 11, "3dgs", False),
        ("clm", 11, "3dgs", False),
        ("clm", 20, "3dgs", False),  # 20: on the checkpoint schedule
        ("clm", 11, "2dgs", False),  # with its normal and distortion terms from the start
        # rotations kept on the GPU by the first run: the resumed one keeps them there too
        ("clm", 11, "3dgs", True),
    ],
)
def test_ctrl_c_then_resume_continues_exactly(
    scene, tmp_path, offload, stop, method, rotations_key, monkeypatch
):
    """A stop at any step, a checkpoint there, and a resume give the run that never stopped,
    bit for bit: parameters, both moments, lazy rows' steps and density statistics."""
    options = {"normal_from": 0, "distortion_weight": 10.0, "distortion_from": 0}
    extra = {"method": method, "method_options": options if method == "2dgs" else {}}
    if rotations_key:
        monkeypatch.setattr(engine_factory, "_walk_on_gpu", walk_always_on_gpu)
    straight = Trainer(short_config(scene, tmp_path / "a", offload, **extra))
    assert straight.engine.spec["quats"].key == rotations_key
    straight.run()
    straight.close()

    stopped = Trainer(short_config(scene, tmp_path / "b", offload, **extra))
    inner = stopped.engine.train_step

    def step_then_interrupt(*args, **kwargs):
        inner(*args, **kwargs)
        if stopped.engine.step == stop:
            os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C path

    stopped.engine.train_step = step_then_interrupt
    with pytest.raises(Interrupted) as info:
        stopped.run()
    at_stop = stopped.engine.snapshot()
    stopped.close()
    assert info.value.step == stop
    # Read for another engine, the checkpoint's lazy rows are caught up on the way (by the
    # schedule it records) to what the engine itself holds caught up.
    ckpt = Checkpoint(info.value.checkpoint)
    caught = list(checkpoint_source(ckpt, stopped.spec).chunks)
    held = (at_stop.params, at_stop.exp_avg, at_stop.exp_avg_sq)
    for kind, state in zip(MOMENT_KINDS, held, strict=True):
        for name, values in state.items():
            got = torch.cat([getattr_kind(c, kind)[name] for c in caught])
            torch.testing.assert_close(got, values, rtol=1e-6, atol=1e-9)
    if offload == "clm":
        last = torch.cat([b["lazy/last"] for b in ckpt.blocks(["lazy/last"])])
        assert (last < stop).any()  # rows were behind, saved so
    assert not (tmp_path / "b" / "point_cloud.ply").exists()

    monkeypatch.undo()  # the resumed run's own choice would leave the rotations in host rows
    args = ["--resume", "--output", str(tmp_path / "b"), "--no-progress"]
    assert train_main(args) == 0
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert a["param"]["means"].shape[0] != 0
    kept = [p.name for p in list_checkpoints(tmp_path / "b")]
    assert kept == ["step_0000020.ckpt", "step_0000040.ckpt"]  # --keep-checkpoints 2
    assert ("lazy" in a) == (offload == "clm")  # lazy rows are saved as they are
    for kind in a:
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), (kind, name)
    if "lazy" in a:  # some rows were behind: a checkpoint that caught them up would differ
        assert (a["lazy"]["last"] < 40).any()
    ply_a = (tmp_path / "a" / "point_cloud.ply").read_bytes()
    assert ply_a == (tmp_path / "b" / "point_cloud.ply").read_bytes()
    log_b = (tmp_path / "b" / "train_log.csv").read_text().splitlines()
    log_a = (tmp_path / "a" / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in log_a] == [r.split(",")[:3] for r in log_b]


def test_ply_is_in_the_scene_frame(scene, tmp_path):
    out = tmp_path / "run"
    code = train_main(
        [str(scene), "--output", str(out), "--steps", "2", "--densify-start", "1000", *FAST]
    )
    assert code == 0
    splats = read_ply(out / "point_cloud.ply")
    ckpt = Checkpoint(list_checkpoints(out)[-1])
    scale = ckpt.meta["to_train"]["scale"]
    assert abs(scale - 1.0) > 1e-3  # training really works in a normalised frame
    # After two small steps the Gaussians still sit on the SfM points of the COLMAP model.
    points = read_model(scene / "sparse" / "0").points.xyz
    assert splats["means"].shape[0] == points.shape[0]
    extent = np.ptp(points, axis=0).max()
    assert np.abs(splats["means"] - points).max() < 0.01 * extent
    train_scales = final_params(out)["param"]["scales"].numpy()
    np.testing.assert_allclose(splats["scales"], train_scales - math.log(scale), atol=1e-5)


def make_controller_engine(n=6):
    spec = gaussian_splatting_spec(1)
    params = {
        "means": torch.zeros(n, 3),
        "scales": torch.log(torch.tensor([0.005, 0.005, 0.5, 0.5, 0.005, 0.5]))[:, None].expand(
            n, 3
        ),
        "quats": torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
        "opacities": torch.tensor([2.0, 2.0, 2.0, 2.0, -7.0, 2.0]),
        "sh0": torch.arange(n, dtype=torch.float32)[:, None, None].repeat(1, 1, 3),
        "shN": torch.zeros(n, 3, 3),
    }
    engine = ResidentEngine(
        params,
        spec=spec,
        render_fn=render_torch,
        lrs=LearningRates(spec, 100),
        adam=AdamConfig(),
        device=torch.device("cpu"),
    )
    return engine


def test_clone_split_prune_and_reset():
    engine = make_controller_engine()
    cfg = DensifyConfig(start=0, stop=1000, every=10, reset_every=30, grow_scale3d=0.01)
    ctl = DensityController(
        cfg, GaussianSplatting(), gaussian_splatting_spec(1), 1.0, 1, torch.device("cpu")
    )
    ctl.grad2d = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])  # rows 0, 2, 4 have high gradients
    ctl.count = torch.ones(6)
    engine.step = 10
    report = ctl.after_step(engine, 10)
    # Small rows 0 and 4 are cloned and large row 2 split in two; then row 4, transparent, is
    # pruned with its clone. Row 5 is large but its gradient is low: kept (world-space pruning
    # starts after the first reset).
    assert (report.cloned, report.split, report.pruned) == (2, 1, 2)
    assert engine.num_gaussians == 6 + 2 + 2 - 1 - 2
    colours = sorted(engine.params["sh0"][:, 0, 0].tolist())
    assert colours == [0, 0, 1, 2, 2, 3, 5]  # clone of 0, two children of 2, no 4
    children = engine.params["sh0"][:, 0, 0] == 2
    scales = torch.exp(engine.params["scales"][children])
    torch.testing.assert_close(scales, torch.full_like(scales, 0.5 / 1.6))
    assert (ctl.grad2d == 0).all() and ctl.grad2d.numel() == 7

    report = ctl.after_step(engine, 30)  # the opacity reset really happens
    assert report is not None
    assert torch.sigmoid(engine.params["opacities"]).max() <= 0.01 + 1e-6


def test_growth_is_capped_at_max_gaussians():
    engine = make_controller_engine()
    cfg = DensifyConfig(start=0, stop=1000, every=10, reset_every=0)
    ctl = DensityController(
        cfg, GaussianSplatting(), gaussian_splatting_spec(1), 1.0, 1, torch.device("cpu"), 7
    )
    ctl.grad2d = torch.tensor([1.0, 0.5, 1.0, 0.0, 0.0, 0.0])
    ctl.count = torch.ones(6)
    report = ctl.after_step(engine, 10)
    assert report.capped == 2
    assert engine.num_gaussians - report.split + report.pruned <= 7


def run_cli(args, capsys):
    code = train_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda s, t: [str(t / "missing")], "missing"),
        (lambda s, t: [str(s), "--steps", "ten"], "--steps"),
        (lambda s, t: [str(s), "--preset", "nonesuch"], "nonesuch"),
        (lambda s, t: [str(s), "--batch-size", "100"], "--batch-size"),
        (lambda s, t: [str(s), "--output", str(t / "file.txt" / "run")], "file.txt"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(scene, tmp_path, capsys, make_args, message):
    (tmp_path / "file.txt").write_text("not a folder")
    code, err = run_cli([*make_args(scene, tmp_path), *FAST], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_corrupt_model_and_wrong_image_size(scene, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(scene, broken)
    images_bin = broken / "sparse" / "0" / "images.bin"
    images_bin.write_bytes(images_bin.read_bytes()[:100])
    code, err = run_cli([str(broken), "--output", str(tmp_path / "r1"), *FAST], capsys)
    assert code == 2 and "images.bin" in err[0] and len(err) == 1

    shutil.rmtree(broken)
    shutil.copytree(scene, broken)
    first = sorted((broken / "images").iterdir())[0]
    from PIL import Image

    Image.new("RGB", (10, 10)).save(first)
    code, err = run_cli([str(broken), "--output", str(tmp_path / "r2"), *FAST], capsys)
    assert code == 2 and first.name in err[0] and len(err) == 1


def test_empty_point_cloud_is_refused(scene, tmp_path, capsys):
    import shutil

    empty = tmp_path / "empty"
    shutil.copytree(scene, empty)
    (empty / "sparse" / "0" / "points3D.bin").write_bytes(struct.pack("<Q", 0))
    code, err = run_cli([str(empty), "--output", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2 and "points3D" in err[0]


def test_a_fresh_run_refuses_to_overwrite_another(scene, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main([str(scene), "--output", str(out), "--steps", "1", *FAST]) == 0
    capsys.readouterr()
    code, err = run_cli([str(scene), "--output", str(out), "--steps", "1", *FAST], capsys)
    assert code == 2 and "--resume" in err[0]


def test_outputs_of_a_run(scene, tmp_path):
    out = tmp_path / "run"
    assert train_main([str(scene), "--output", str(out), "--steps", "12", *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["psnr"] > 5
    assert "lpips_note" in metrics or metrics["lpips"] is not None
    assert len(list((out / "renders" / "test").glob("*.png"))) == 2
    rows = (out / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 12 // 5 + 1
    assert (out / "train_plot.png").stat().st_size > 1000
    assert "done:" in (out / "train.log").read_text()
