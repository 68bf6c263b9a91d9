"""Undistortion against the OpenCV lens model written out independently here."""

import numpy as np
import pytest

from clm.data.types import Distortion
from clm.data.undistort import (
    distort_normalized,
    pinhole_for_training,
    split_camera_params,
    undistort_image,
    undistort_normalized,
    undistorted_camera,
)
from clm.errors import ClmError

W, H = 160, 120
CAMERAS = [
    Distortion("SIMPLE_RADIAL", (-0.12,), 150.0, 150.0, 81.0, 59.0, W, H),
    Distortion("RADIAL", (0.08, 0.02), 140.0, 140.0, 80.0, 60.0, W, H),
    Distortion("OPENCV", (-0.2, 0.05, 0.002, -0.003), 150.0, 145.0, 78.0, 62.5, W, H),
]


def lens(d: Distortion, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's radial-tangential model, from its documentation."""
    k1, k2, p1, p2 = (*d.params, 0.0, 0.0, 0.0)[:4]
    r2 = x**2 + y**2
    radial = 1 + k1 * r2 + k2 * r2**2
    return (
        x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x**2),
        y * radial + p1 * (r2 + 2 * y**2) + 2 * p2 * x * y,
    )


def project_distorted(d: Distortion, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xd, yd = lens(d, x, y)
    return d.fx * xd + d.cx, d.fy * yd + d.cy


def unlens(d: Distortion, xd: np.ndarray, yd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point inversion (OpenCV's undistortPoints iteration), unlike the code's Newton."""
    x, y = xd.copy(), yd.copy()
    for _ in range(200):
        fx, fy = lens(d, x, y)
        x, y = x - (fx - xd), y - (fy - yd)
    return x, y


def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth colour pattern on the normalised image plane, uint8-valued in [20, 235]."""
    r = 127.5 + 107.5 * np.sin(9 * x) * np.cos(7 * y)
    g = 127.5 + 107.5 * np.cos(11 * x + 3 * y)
    b = 127.5 + 107.5 * np.sin(5 * (x - y))
    return np.stack([r, g, b], axis=-1)


def output_rays(d: Distortion) -> tuple[np.ndarray, np.ndarray]:
    k, out_w, out_h = undistorted_camera(d)
    u, v = np.meshgrid(np.arange(out_w) + 0.5, np.arange(out_h) + 0.5)
    return (u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1]


def test_split_camera_params():
    assert split_camera_params("SIMPLE_PINHOLE", [5, 1, 2], "c") == ((5, 5, 1, 2), ())
    assert split_camera_params("PINHOLE", [5, 6, 1, 2], "c") == ((5, 6, 1, 2), ())
    assert split_camera_params("SIMPLE_RADIAL", [5, 1, 2, 0.1], "c") == ((5, 5, 1, 2), (0.1,))
    assert split_camera_params("RADIAL", [5, 1, 2, 0.1, 0.2], "c") == ((5, 5, 1, 2), (0.1, 0.2))
    params = [5, 6, 1, 2, 0.1, 0.2, 0.3, 0.4]
    assert split_camera_params("OPENCV", params, "c") == ((5, 6, 1, 2), (0.1, 0.2, 0.3, 0.4))


@pytest.mark.parametrize("model", ["FULL_OPENCV", "OPENCV_FISHEYE", "FOV", "THIN_PRISM_FISHEYE"])
def test_unsupported_models_are_refused(model):
    with pytest.raises(ClmError) as info:
        split_camera_params(model, [1.0] * 12, "sparse/0/cameras.bin: camera 4")
    message = str(info.value)
    assert message.startswith("sparse/0/cameras.bin: camera 4: camera model " + model)
    assert "colmap image_undistorter" in message


def test_zero_coefficients_are_a_plain_pinhole():
    k, w, h, distortion = pinhole_for_training(
        "OPENCV", (100, 101, 50, 40), (0, 0, 0, 0), 99, 80, "c"
    )
    assert distortion is None and (w, h) == (99, 80)
    np.testing.assert_array_equal(k, [[100, 0, 50], [0, 101, 40], [0, 0, 1]])


def test_pinhole_for_training_sets_the_distortion():
    k, w, h, d = pinhole_for_training("RADIAL", (140, 140, 80, 60), (0.08, 0.02), W, H, "c")
    assert d == CAMERAS[1]
    ref_k, ref_w, ref_h = undistorted_camera(d)
    np.testing.assert_array_equal(k, ref_k)
    assert (w, h) == (ref_w, ref_h)


@pytest.mark.parametrize("d", CAMERAS, ids=lambda d: d.model)
def test_newton_inverse_matches_the_lens(d):
    rng = np.random.default_rng(0)
    xy = rng.uniform(-0.5, 0.5, size=(500, 2))
    xd, yd = lens(d, xy[:, 0], xy[:, 1])
    np.testing.assert_allclose(distort_normalized(d, xy), np.stack([xd, yd], 1), atol=1e-15)
    back = undistort_normalized(d, np.stack([xd, yd], axis=1))
    np.testing.assert_allclose(back, xy, atol=1e-10)


@pytest.mark.parametrize("d", CAMERAS, ids=lambda d: d.model)
def test_crop_samples_inside_and_is_tight(d):
    k = undistorted_camera(d)[0]
    assert k[0, 0] == d.fx and k[1, 1] == d.fy  # the focal lengths are kept
    u, v = project_distorted(d, *output_rays(d))
    # Within a thousandth of a pixel of the outermost pixel centres (the image itself
    # extends half a pixel further): the edges are searched at half-pixel steps.
    eps = 1e-3
    assert u.min() >= 0.5 - eps and u.max() <= W - 0.5 + eps
    assert v.min() >= 0.5 - eps and v.max() <= H - 0.5 + eps
    # One more column or row on any side would sample outside the image (alpha = 0).
    x, y = output_rays(d)
    step_x, step_y = 1 / k[0, 0], 1 / k[1, 1]
    assert project_distorted(d, x[:, 0] - step_x, y[:, 0])[0].min() < 0.5
    assert project_distorted(d, x[:, -1] + step_x, y[:, -1])[0].max() > W - 0.5
    assert project_distorted(d, x[0], y[0] - step_y)[1].min() < 0.5
    assert project_distorted(d, x[-1], y[-1] + step_y)[1].max() > H - 0.5


def test_barrel_grows_and_pincushion_shrinks():
    _, w_barrel, h_barrel = undistorted_camera(CAMERAS[0])
    _, w_pin, h_pin = undistorted_camera(CAMERAS[1])
    assert w_barrel > W and h_barrel > H
    assert w_pin < W and h_pin < H


@pytest.mark.parametrize("d", CAMERAS, ids=lambda d: d.model)
def test_undistorts_a_known_pattern(d):
    # Render the pattern as the distorted camera sees it, then undistort it.
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    x, y = unlens(d, (u - d.cx) / d.fx, (v - d.cy) / d.fy)
    distorted = np.rint(pattern(x, y)).astype(np.uint8)
    out = undistort_image(distorted, d)
    _, out_w, out_h = undistorted_camera(d)
    assert out.shape == (out_h, out_w, 3) and out.dtype == np.uint8
    expected = pattern(*output_rays(d))
    error = np.abs(out.astype(np.float64) - expected)
    assert error.mean() < 0.5 and error.max() < 2.0
    # Sampling the distorted image without undistorting would be far off.
    naive = pattern(
        *np.meshgrid((np.arange(out_w) + 0.5 - d.cx) / d.fx, (np.arange(out_h) + 0.5 - d.cy) / d.fy)
    )
    assert np.abs(naive - expected).mean() > 5 * error.mean()


def test_projected_point_lands_where_the_pinhole_says():
    d = CAMERAS[2]
    point = np.array([0.31, -0.22, 1.7])  # camera coordinates
    x, y = point[0] / point[2], point[1] / point[2]
    u_d, v_d = project_distorted(d, np.array(x), np.array(y))
    # A small Gaussian spot where the distorted camera images the point.
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    spot = 250 * np.exp(-((u - u_d) ** 2 + (v - v_d) ** 2) / (2 * 1.5**2))
    image = np.repeat(np.rint(spot).astype(np.uint8)[..., None], 3, axis=2)
    out = undistort_image(image, d)[..., 0].astype(np.float64)
    k, out_w, out_h = undistorted_camera(d)
    expected = k @ point / point[2]
    uu, vv = np.meshgrid(np.arange(out_w) + 0.5, np.arange(out_h) + 0.5)
    weights = out * (out > 20)
    centroid = np.array([(weights * uu).sum(), (weights * vv).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, expected[:2], atol=0.1)


def test_too_strong_distortion_is_refused():
    d = Distortion("SIMPLE_RADIAL", (-1.5,), 60.0, 60.0, 80.0, 60.0, W, H)
    with pytest.raises(ClmError, match="cannot be inverted"):
        undistorted_camera(d)
    with pytest.raises(ClmError, match=r"^cams\.bin: camera 2: SIMPLE_RADIAL distortion"):
        pinhole_for_training("SIMPLE_RADIAL", (60, 60, 80, 60), (-1.5,), W, H, "cams.bin: camera 2")
