"""``clm-train --tensorboard``: scalars and held-out images that TensorBoard reads back."""

import sys

import pytest

from clm.cli.train import main as train_main
from clm.synthetic.generate import generate_scene

FAST = ["--device", "cpu", "--no-progress", "--eval-every", "0", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_scene")
    size = {"images": 8, "width": 48, "height": 32}
    return generate_scene(root, "tiny", **size, device="cpu", progress=False)


def test_a_short_run_writes_scalars_and_images_tensorboard_reads(scene, tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    args = [str(scene), "--output", str(out), "--steps", "3", "--log-every", "1", "--tensorboard"]
    assert train_main([*args, *FAST]) == 0
    events = accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/psnr",
        "train/gaussians",
        "speed/images_per_s",
        "memory/host_rss_gib",
        "engine/visible_rows_per_step",
        "engine/bytes_to_gpu_per_step",
    ):
        assert tag in scalars
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3]
    assert events.Scalars("train/gaussians")[0].value > 0
    # The final evaluation: metrics and ground truth | render of the held-out view.
    assert [e.step for e in events.Scalars("eval/psnr")] == [3]
    (image_tag,) = events.Tags()["images"]
    image = events.Images(image_tag)[0]
    assert image.step == 3 and (image.width, image.height) == (2 * 48, 32)


def test_without_tensorboard_one_error_line(scene, tmp_path, monkeypatch, capsys):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them raises ImportError
    out = tmp_path / "run"
    assert train_main([str(scene), "--output", str(out), "--tensorboard", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install clm[tensorboard]" in err[0]
    assert not out.exists()
