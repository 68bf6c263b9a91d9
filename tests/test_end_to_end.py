"""The README's demo, shortened: a synthetic scene trained on the CPU reaches a stated quality on
views it never saw."""

import json

from clm.cli.train import main as train_main
from clm.model.ply import read_ply
from clm.synthetic.generate import generate_scene

# Held-out PSNR after 600 steps of the tiny preset, seed 0. Measured 19.3 dB with this test's
# evaluation at step 300, 21.0 dB without it, 21.6 dB with --offload none: the engines compute the
# same steps to rounding (tests/test_engines.py, evaluation in between included), but over 600
# steps rounding-level differences, such as when lazily updated rows are caught up, change
# densification decisions, and this small scene's result moves by about 2 dB with them.
MIN_PSNR = 19.0


def test_tiny_scene_trains_to_a_stated_psnr(tmp_path):
    scene = generate_scene(tmp_path / "scene", "tiny", device="cpu", progress=False)
    out = tmp_path / "run"
    args = [str(scene), "--output", str(out), "--preset", "tiny", "--steps", "600"]
    assert train_main([*args, "--device", "cpu", "--no-progress", "--eval-every", "300"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 5
    assert metrics["psnr"] >= MIN_PSNR, metrics["psnr"]
    assert metrics["ssim"] >= 0.7, metrics["ssim"]
    splats = read_ply(out / "point_cloud.ply")
    assert splats["means"].shape[0] == metrics["num_gaussians"] > 3000  # densification grew it
    assert splats["shN"].shape[1] == 15
