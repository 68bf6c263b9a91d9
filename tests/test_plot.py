"""The training plot: a real PNG with each curve in its panel, drawn the right way up; and the
video writer's failures, each a ClmError naming the file."""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clm.errors import ClmError
from clm.report.plot import (
    EVAL_PSNR_COLOR,
    LOSS_COLOR,
    PLOT_SIZE,
    TRAIN_PSNR_COLOR,
    plot_training_log,
)

NAN = float("nan")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == PLOT_SIZE
        return np.asarray(image.convert("RGB"))


def where(rgb: np.ndarray, color: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of pixels of exactly ``color``."""
    ys, xs = np.nonzero((rgb == np.array(color, dtype=np.uint8)).all(axis=-1))
    return ys, xs


def typical_run(tmp_path: Path) -> Path:
    steps = np.arange(0, 1000, 10)
    losses = 0.3 * np.exp(-steps / 300) + 0.01
    train_psnr = 15 + 10 * (1 - np.exp(-steps / 300))
    path = tmp_path / "log.png"
    plot_training_log(path, steps, losses, train_psnr, [250, 500, 990], [18.0, 21.0, 23.5])
    return path


def test_png_size_and_not_blank(tmp_path: Path) -> None:
    rgb = pixels(typical_run(tmp_path))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 4
    dark = (rgb.sum(axis=-1) < 100).mean()
    assert 0.001 < dark < 0.2  # frames, ticks and text, but not a black image


def test_curves_are_in_their_panels(tmp_path: Path) -> None:
    rgb = pixels(typical_run(tmp_path))
    half = PLOT_SIZE[1] // 2
    loss_y, _ = where(rgb, LOSS_COLOR)
    train_y, _ = where(rgb, TRAIN_PSNR_COLOR)
    eval_y, _ = where(rgb, EVAL_PSNR_COLOR)
    assert len(loss_y) > 200 and (loss_y < half).all()
    # The PSNR legend sits in the bottom panel too, so every PSNR pixel is below the middle.
    assert len(train_y) > 200 and (train_y > half).all()
    assert len(eval_y) > 3 * 20 and (eval_y > half).all()


def test_falling_loss_and_rising_psnr_are_drawn_that_way(tmp_path: Path) -> None:
    rgb = pixels(typical_run(tmp_path))
    half = PLOT_SIZE[1] // 2

    def left_and_right_heights(color: tuple[int, int, int]) -> tuple[float, float]:
        ys, xs = where(rgb, color)
        inside = (ys > half) if color == TRAIN_PSNR_COLOR else (ys < half)
        ys, xs = ys[inside], xs[inside]
        lo, hi = np.percentile(xs, [2, 98])
        span = hi - lo
        return ys[xs < lo + 0.1 * span].mean(), ys[xs > hi - 0.1 * span].mean()

    loss_left, loss_right = left_and_right_heights(LOSS_COLOR)
    assert loss_left < loss_right - 50  # image rows grow downwards: high loss first
    psnr_left, psnr_right = left_and_right_heights(TRAIN_PSNR_COLOR)
    assert psnr_left > psnr_right + 50


def test_loss_axis_is_logarithmic(tmp_path: Path) -> None:
    # 10^(-step/50) is a straight line on a log axis and strongly bent on a linear one.
    steps = np.arange(0, 201)
    path = tmp_path / "log.png"
    plot_training_log(path, steps, 10.0 ** (-steps / 50), np.full(201, 20.0))
    ys, xs = where(pixels(path), LOSS_COLOR)
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = np.abs(ys - (slope * xs + intercept))
    assert slope > 0.1
    assert residual.max() < 4


def test_single_point(tmp_path: Path) -> None:
    path = tmp_path / "log.png"
    plot_training_log(path, [1], [0.5], [12.0], [1], [11.0])
    rgb = pixels(path)
    assert len(where(rgb, LOSS_COLOR)[0]) > 0
    half = PLOT_SIZE[1] // 2
    train_y, _ = where(rgb, TRAIN_PSNR_COLOR)
    assert (train_y > half).sum() > 0
    assert len(where(rgb, EVAL_PSNR_COLOR)[0]) > 0


def test_nan_leaves_a_gap(tmp_path: Path) -> None:
    steps = np.arange(100)
    losses = np.full(100, 0.1) * np.linspace(1, 0.5, 100)
    losses[40:60] = NAN
    path = tmp_path / "log.png"
    plot_training_log(path, steps, losses, np.linspace(10, 20, 100))
    _, xs = where(pixels(path), LOSS_COLOR)
    lo, hi = xs.min(), xs.max()
    per_step = (hi - lo) / 99
    gap = (xs > lo + 42 * per_step) & (xs < lo + 57 * per_step)
    assert not gap.any()
    assert (xs < lo + 39 * per_step).any() and (xs > lo + 60 * per_step).any()


def test_constant_series_draw_flat_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.png"
    plot_training_log(path, [0, 1, 2, 3], [0.2] * 4, [25.0] * 4, [3], [25.0])
    rgb = pixels(path)
    loss_y, _ = where(rgb, LOSS_COLOR)
    assert len(loss_y) > 0 and np.ptp(loss_y) <= 2
    half = PLOT_SIZE[1] // 2
    train_y, _ = where(rgb, TRAIN_PSNR_COLOR)
    train_y = train_y[train_y > half + 40]  # skip the legend's sample line
    assert len(train_y) > 0 and np.ptp(train_y) <= 2


@pytest.mark.parametrize(
    "series",
    [
        ([], [], [], [], []),
        ([0, 1, 2], [NAN, NAN, NAN], [NAN, NAN, NAN], [], []),
        ([0, 1, 2], [0.0, -1.0, math.inf], [math.inf, 20.0, NAN], [2], [NAN]),
        ([5, 5, 5], [1e-12, 1e3, 1.0], [60.0, 1.0, 30.0], [5], [30.0]),
    ],
    ids=["empty", "all-nan", "zero-negative-inf", "same-step-wide-range"],
)
def test_edge_cases_still_give_a_plot(tmp_path: Path, series) -> None:
    path = tmp_path / "log.png"
    plot_training_log(path, *series)
    rgb = pixels(path)
    assert (rgb.sum(axis=-1) < 100).any()  # at least the frames and labels


def test_mismatched_lengths_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lengths"):
        plot_training_log(tmp_path / "log.png", [0, 1], [0.1], [10.0, 11.0])
    with pytest.raises(ValueError, match="lengths"):
        plot_training_log(tmp_path / "log.png", [0], [0.1], [10.0], [0, 1], [10.0])


def test_write_is_atomic_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "log.png"
    path.write_bytes(b"old")
    plot_training_log(path, [0, 1], [0.2, 0.1], [10.0, 12.0])
    assert pixels(path).shape[:2] == PLOT_SIZE[::-1]
    assert [p.name for p in tmp_path.iterdir()] == ["log.png"]


def test_unwritable_folder_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(ClmError, match=re.escape(str(blocker))):
        plot_training_log(blocker / "log.png", [0], [0.1], [10.0])
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-folder"]


def test_video_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    pytest.importorskip("imageio_ffmpeg")
    from clm.report.video import VideoWriter

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(ClmError, match=rf"cannot create the folder {re.escape(str(blocker))}"):
        VideoWriter(blocker / "v.mp4", 10)


@pytest.mark.parametrize("frames", [1, 60])
def test_video_that_ffmpeg_cannot_write_is_a_clm_error(tmp_path: Path, frames: int) -> None:
    """Its folder gone under it: ffmpeg fails when the frames arrive (many) or at the end (one),
    which used to be a BrokenPipe or FileNotFoundError traceback."""
    pytest.importorskip("imageio_ffmpeg")
    from clm.report.video import VideoWriter

    folder = tmp_path / "out"
    message = r"out/v\.mp4: ffmpeg could not write the video"
    with pytest.raises(ClmError, match=message), VideoWriter(folder / "v.mp4", 10) as video:
        shutil.rmtree(folder)
        for _ in range(frames):
            video.append(np.zeros((256, 256, 3), np.uint8))
    assert not folder.exists()
