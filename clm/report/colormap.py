"""False colour for depth and error maps, without a plotting library.

The map runs through nine colours of viridis (dark purple, blue, green, yellow), whose
lightness rises steadily, so larger values read as brighter in colour and in greyscale print.
"""

from __future__ import annotations

import numpy as np

_STOPS = np.array(
    [
        (0x44, 0x01, 0x54),
        (0x47, 0x2D, 0x7B),
        (0x3B, 0x52, 0x8B),
        (0x2C, 0x72, 0x8E),
        (0x21, 0x91, 0x8C),
        (0x28, 0xAE, 0x80),
        (0x5E, 0xC9, 0x62),
        (0xAD, 0xDC, 0x30),
        (0xFD, 0xE7, 0x25),
    ],
    dtype=np.float64,
)
_POSITIONS = np.linspace(0.0, 1.0, len(_STOPS))
#: 256 RGB entries, the stops joined by straight lines.
TABLE = (
    np.stack(
        [np.interp(np.linspace(0.0, 1.0, 256), _POSITIONS, _STOPS[:, c]) for c in range(3)], axis=1
    )
    .round()
    .astype(np.uint8)
)

#: Mean absolute error (0..1 colour scale) shown at the bright end of an error map.
ERROR_FULL_SCALE = 0.25


def colorize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 RGB ``[..., 3]`` of ``values``: ``low`` (or less) dark, ``high`` (or more) bright."""
    span = high - low if high > low else 1.0
    index = np.clip((values - low) / span, 0.0, 1.0) * 255.0
    return TABLE[np.nan_to_num(index).round().astype(np.int64)]


def depth_range(depth: np.ndarray, alpha: np.ndarray) -> tuple[float, float] | None:
    """The 1st and 99th percentiles of the depth where something was drawn (``alpha > 0``), so a
    few stray far or near splats do not flatten the rest; None where nothing was."""
    drawn = depth[alpha > 0]
    if drawn.size == 0:
        return None
    low, high = np.percentile(drawn, [1.0, 99.0])
    return float(low), float(high)


def colorize_depth(depth: np.ndarray, alpha: np.ndarray, near: float, far: float) -> np.ndarray:
    """Near bright, far dark, black where nothing was drawn."""
    image = colorize(near + far - depth, near, far)
    image[alpha <= 0] = 0
    return image


def error_map(target: np.ndarray, render: np.ndarray) -> np.ndarray:
    """uint8 RGB of the per-pixel mean absolute error of two uint8 images; bright at
    :data:`ERROR_FULL_SCALE` or more."""
    error = np.abs(target.astype(np.float32) - render.astype(np.float32)).mean(axis=-1) / 255.0
    return colorize(error, 0.0, ERROR_FULL_SCALE)
