"""A training-curve PNG drawn with Pillow alone, so a run needs no plotting library.

Two panels share the step axis: the loss on a log scale (it falls over decades) and PSNR, with
the training PSNR as a line and held-out PSNR as markers. The plot is redrawn during training,
so it accepts what an early or broken run produces: one point, NaNs, constant or empty series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clm.files import save_png

PLOT_SIZE = (960, 720)
LOSS_COLOR = (31, 119, 180)
TRAIN_PSNR_COLOR = (255, 127, 14)
EVAL_PSNR_COLOR = (44, 160, 44)

_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_GRID = (225, 225, 225)
_MUTED = (120, 120, 120)
# Plot area inside each panel: left, top, right, bottom margins in pixels.
_MARGINS = (80, 34, 24, 50)


@dataclass(frozen=True)
class _Axis:
    """A data interval mapped onto a pixel interval, linear or log10."""

    lo: float
    hi: float
    log: bool = False

    def position(self, values: np.ndarray, start: float, end: float) -> np.ndarray:
        data = np.log10(values) if self.log else values
        lo, hi = (math.log10(self.lo), math.log10(self.hi)) if self.log else (self.lo, self.hi)
        return start + (data - lo) / (hi - lo) * (end - start)


@dataclass(frozen=True)
class _Panel:
    """Pixel box of one panel's plot area."""

    left: int
    top: int
    right: int
    bottom: int


def plot_training_log(
    path: Path,
    steps: Sequence[float],
    losses: Sequence[float],
    train_psnr: Sequence[float],
    eval_steps: Sequence[float] = (),
    eval_psnr: Sequence[float] = (),
) -> None:
    """Draw loss and PSNR against step into the PNG at ``path``, replacing it atomically."""
    steps_a, losses_a, train_a = (
        np.asarray(v, dtype=np.float64) for v in (steps, losses, train_psnr)
    )
    eval_steps_a, eval_a = (np.asarray(v, dtype=np.float64) for v in (eval_steps, eval_psnr))
    if not len(steps_a) == len(losses_a) == len(train_a) or len(eval_steps_a) != len(eval_a):
        raise ValueError(
            f"{path}: series lengths differ: steps {len(steps_a)}, losses {len(losses_a)}, "
            f"train_psnr {len(train_a)}, eval_steps {len(eval_steps_a)}, eval_psnr {len(eval_a)}"
        )
    width, height = PLOT_SIZE
    image = Image.new("RGB", PLOT_SIZE, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x_axis = _linear_axis(np.concatenate([steps_a, eval_steps_a]))
    positive_loss = np.where(losses_a > 0, losses_a, np.nan)

    top = _panel_box(0, 0, width, height // 2)
    loss_axis = _log_axis(positive_loss)
    _draw_frame(image, draw, font, top, x_axis, loss_axis, "loss")
    _draw_title(draw, font, top, f"Training loss (last {_latest(positive_loss, '{:.4g}')})")
    _draw_line(draw, top, x_axis, loss_axis, steps_a, positive_loss, LOSS_COLOR)
    if not _valid(steps_a, positive_loss).any():
        _draw_no_data(draw, font, top)

    bottom = _panel_box(0, height // 2, width, height)
    psnr_axis = _linear_axis(np.concatenate([train_a, eval_a]))
    _draw_frame(image, draw, font, bottom, x_axis, psnr_axis, "PSNR (dB)")
    title = f"PSNR (last: train {_latest(train_a, '{:.2f}')}, held-out {_latest(eval_a, '{:.2f}')})"
    _draw_title(draw, font, bottom, title)
    _draw_legend(draw, font, bottom)
    _draw_line(draw, bottom, x_axis, psnr_axis, steps_a, train_a, TRAIN_PSNR_COLOR)
    _draw_markers(draw, bottom, x_axis, psnr_axis, eval_steps_a, eval_a)
    if not (_valid(steps_a, train_a).any() or _valid(eval_steps_a, eval_a).any()):
        _draw_no_data(draw, font, bottom)

    save_png(Path(path), image)


def _panel_box(left: int, top: int, right: int, bottom: int) -> _Panel:
    m_left, m_top, m_right, m_bottom = _MARGINS
    return _Panel(left + m_left, top + m_top, right - m_right, bottom - m_bottom)


def _valid(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.isfinite(xs) & np.isfinite(ys)


def _latest(values: np.ndarray, fmt: str) -> str:
    finite = values[np.isfinite(values)]
    return fmt.format(finite[-1]) if len(finite) else "none"


def _span(values: np.ndarray, zero_pad: float) -> tuple[float, float]:
    """Finite min and max, widened by 3 %, or by ``zero_pad`` when they coincide."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = (hi - lo) * 0.03 if hi > lo else max(abs(lo) * 0.05, zero_pad)
    return lo - pad, hi + pad


def _linear_axis(values: np.ndarray) -> _Axis:
    return _Axis(*_span(values, zero_pad=1.0))


def _log_axis(values: np.ndarray) -> _Axis:
    lo, hi = _span(np.log10(values), zero_pad=0.5)
    return _Axis(10.0**lo, 10.0**hi, log=True)


def _linear_ticks(axis: _Axis, min_step: float = 0.0) -> list[tuple[float, str]]:
    """About six ticks at 1, 2 or 5 times a power of ten, spaced at least ``min_step``."""
    raw = max((axis.hi - axis.lo) / 6, min_step)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    first = math.ceil(axis.lo / step)
    ticks = [i * step for i in range(first, math.floor(axis.hi / step) + 1)]
    return [(t, f"{t:.{decimals}f}") for t in ticks]


def _log_ticks(axis: _Axis) -> list[tuple[float, str]]:
    """Decades, thinned to at most eight; 2x and 5x as well when fewer than two decades show."""
    lo, hi = math.log10(axis.lo), math.log10(axis.hi)
    decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    every = max(1, math.ceil(len(decades) / 8))
    values = [10.0**d for d in decades[::every]]
    if len(decades) < 2:
        candidates = (
            m * 10.0**d for d in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
        )
        values = [v for v in candidates if axis.lo <= v <= axis.hi]
    return [(v, f"{v:g}") for v in values]


def _draw_frame(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    box: _Panel,
    x_axis: _Axis,
    y_axis: _Axis,
    y_label: str,
) -> None:
    """Grid, ticks with labels, the frame and both axis labels."""
    for value, label in _linear_ticks(x_axis, min_step=1.0):  # steps are whole numbers
        x = float(x_axis.position(np.array(value), box.left, box.right))
        draw.line([(x, box.top), (x, box.bottom)], fill=_GRID)
        draw.line([(x, box.bottom), (x, box.bottom + 4)], fill=_INK)
        draw.text((x, box.bottom + 7), label, fill=_INK, font=font, anchor="mt")
    y_ticks = _log_ticks(y_axis) if y_axis.log else _linear_ticks(y_axis)
    for value, label in y_ticks:
        y = float(y_axis.position(np.array(value), box.bottom, box.top))
        draw.line([(box.left, y), (box.right, y)], fill=_GRID)
        draw.line([(box.left - 4, y), (box.left, y)], fill=_INK)
        draw.text((box.left - 7, y), label, fill=_INK, font=font, anchor="rm")
    draw.rectangle([box.left, box.top, box.right, box.bottom], outline=_INK)
    draw.text(
        ((box.left + box.right) / 2, box.bottom + 26), "step", fill=_INK, font=font, anchor="mt"
    )
    _draw_vertical_text(image, font, (box.left - 62, (box.top + box.bottom) // 2), y_label)


def _draw_vertical_text(
    image: Image.Image,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    centre: tuple[int, int],
    text: str,
) -> None:
    """Text rotated to read bottom to top, centred on ``centre``."""
    probe = ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
    mask = Image.new("L", (probe[2] + 2, probe[3] + 2), 0)
    ImageDraw.Draw(mask).text((1, 1), text, fill=255, font=font)
    mask = mask.rotate(90, expand=True)
    corner = (centre[0] - mask.width // 2, centre[1] - mask.height // 2)
    image.paste(Image.new("RGB", mask.size, _INK), corner, mask)


def _draw_title(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    box: _Panel,
    text: str,
) -> None:
    draw.text((box.left, box.top - 10), text, fill=_INK, font=font, anchor="ls")


def _draw_legend(
    draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, box: _Panel
) -> None:
    """Key for the PSNR panel, in the title row so it never hides data."""
    y = box.top - 14
    right = box.right
    draw.text((right, y), "held-out", fill=_INK, font=font, anchor="rm")
    marker_x = right - draw.textlength("held-out", font=font) - 10
    _marker(draw, marker_x, y)
    train_end = marker_x - 14
    draw.text((train_end, y), "train", fill=_INK, font=font, anchor="rm")
    line_end = train_end - draw.textlength("train", font=font) - 6
    draw.line([(line_end - 20, y), (line_end, y)], fill=TRAIN_PSNR_COLOR, width=2)


def _draw_line(
    draw: ImageDraw.ImageDraw,
    box: _Panel,
    x_axis: _Axis,
    y_axis: _Axis,
    xs: np.ndarray,
    ys: np.ndarray,
    color: tuple[int, int, int],
) -> None:
    """A polyline broken at missing values; isolated points become dots so they still show."""
    valid = _valid(xs, ys)
    if not valid.any():
        return
    px = x_axis.position(np.where(valid, xs, x_axis.lo), box.left, box.right)
    py = y_axis.position(np.where(valid, ys, y_axis.hi), box.bottom, box.top)
    # Runs of consecutive valid points, as [start, end) index pairs.
    edges = np.diff(np.concatenate([[0], valid.astype(np.int8), [0]]))
    for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        points = list(zip(px[start:end].tolist(), py[start:end].tolist(), strict=True))
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        else:
            draw.line(points, fill=color, width=2, joint="curve")


def _draw_markers(
    draw: ImageDraw.ImageDraw,
    box: _Panel,
    x_axis: _Axis,
    y_axis: _Axis,
    xs: np.ndarray,
    ys: np.ndarray,
) -> None:
    valid = _valid(xs, ys)
    px = x_axis.position(xs[valid], box.left, box.right)
    py = y_axis.position(ys[valid], box.bottom, box.top)
    for x, y in zip(px.tolist(), py.tolist(), strict=True):
        _marker(draw, x, y)


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float) -> None:
    draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=EVAL_PSNR_COLOR, outline=_INK)


def _draw_no_data(
    draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, box: _Panel
) -> None:
    centre = ((box.left + box.right) / 2, (box.top + box.bottom) / 2)
    draw.text(centre, "no finite values yet", fill=_MUTED, font=font, anchor="mm")
