"""Conventions pinned against values worked out by hand, not against another clm helper: the
quaternion order and handedness, a rotated Gaussian's screen footprint, and the SH basis."""

import math

import numpy as np
import pytest
import torch

from clm.render.projection import project, quat_to_rotmat
from clm.render.sh import sh_to_rgb

# --------------------------------------------------------------------------- rotations


def about(axis, degrees: float) -> list[float]:
    """The (w, x, y, z) quaternion of a rotation by ``degrees`` about the unit ``axis``."""
    half = math.radians(degrees) / 2
    return [math.cos(half), *(math.sin(half) * np.asarray(axis, dtype=float))]


ROTATIONS = [
    # A quarter turn about z takes x to y and y to -x (right-handed).
    pytest.param(about([0, 0, 1], 90), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], id="z-90"),
    # A quarter turn about x takes y to z and z to -y.
    pytest.param(about([1, 0, 0], 90), [[1, 0, 0], [0, 0, -1], [0, 1, 0]], id="x-90"),
    # A third of a turn about (1, 1, 1) cycles x -> y -> z -> x.
    pytest.param([0.5, 0.5, 0.5, 0.5], [[0, 0, 1], [1, 0, 0], [0, 1, 0]], id="xyz-120"),
    # Not normalised: the same rotation.
    pytest.param([2.0, 0.0, 0.0, 2.0], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], id="z-90-scaled"),
    pytest.param([1.0, 0.0, 0.0, 0.0], np.eye(3), id="identity"),
]


@pytest.mark.parametrize("quat, matrix", ROTATIONS)
def test_quaternion_is_w_x_y_z_and_rotates_columns(quat, matrix):
    rot = quat_to_rotmat(torch.tensor([quat], dtype=torch.float64))[0]
    np.testing.assert_allclose(rot.numpy(), matrix, atol=1e-12)


def test_a_quarter_turn_about_z_maps_x_to_y():
    rot = quat_to_rotmat(torch.tensor([about([0, 0, 1], 90)], dtype=torch.float64))[0]
    x = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    np.testing.assert_allclose((rot @ x).numpy(), [0, 1, 0], atol=1e-12)


# --------------------------------------------------------------------------- footprint

FOCAL, DEPTH, CX, CY = 100.0, 5.0, 32.0, 24.0
SCALES = (0.3, 0.1, 0.05)


def footprint(quat, mean=(0.0, 0.0, DEPTH)):
    """Projection of one Gaussian (``SCALES``) by an identity camera of focal ``FOCAL``."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    k = t([[FOCAL, 0, CX], [0, FOCAL, CY], [0, 0, 1]])
    return project(
        t([mean]), t([quat]), t([SCALES]), t([0.9]), torch.eye(4, dtype=torch.float64), k, 64, 48
    )


def test_rotated_gaussian_footprint_on_the_axis():
    """30 degrees about the optical axis: the long axis (x, 0.3) turns towards +y (image down).

    On the axis the Jacobian is (f / z) I, so the 2D covariance is (f/z)^2 times the rotated
    x-y block, plus gsplat's 0.3 px^2 blur:
      xx = 0.3^2 cos^2 30 + 0.1^2 sin^2 30 = 0.0675 + 0.0025 = 0.07
      yy = 0.3^2 sin^2 30 + 0.1^2 cos^2 30 = 0.0225 + 0.0075 = 0.03
      xy = (0.3^2 - 0.1^2) sin 30 cos 30 = 0.08 sqrt(3) / 4 = 0.02 sqrt(3)
    """
    gain = (FOCAL / DEPTH) ** 2
    cov = np.array([[0.07, 0.02 * math.sqrt(3)], [0.02 * math.sqrt(3), 0.03]]) * gain
    cov += 0.3 * np.eye(2)
    inv = np.linalg.inv(cov)
    proj = footprint(about([0, 0, 1], 30))
    np.testing.assert_allclose(proj.means2d[0].numpy(), [CX, CY])
    np.testing.assert_allclose(proj.conics[0].numpy(), [inv[0, 0], inv[0, 1], inv[1, 1]])
    assert proj.conics[0, 1] < 0  # the ellipse leans from top-left to bottom-right


def test_rotated_gaussian_footprint_off_the_axis():
    """A general rotation (Rodrigues' formula here) off the axis, with the full EWA Jacobian."""
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    angle = math.radians(50)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    x, y, z = 0.4, -0.3, DEPTH
    jac = np.array([[FOCAL / z, 0, -FOCAL * x / z**2], [0, FOCAL / z, -FOCAL * y / z**2]])
    cov3 = rot @ np.diag(np.square(SCALES)) @ rot.T
    cov = jac @ cov3 @ jac.T + 0.3 * np.eye(2)
    inv = np.linalg.inv(cov)
    proj = footprint(about(axis, 50), mean=(x, y, z))
    np.testing.assert_allclose(proj.means2d[0].numpy(), [CX + FOCAL * x / z, CY + FOCAL * y / z])
    np.testing.assert_allclose(proj.conics[0].numpy(), [inv[0, 0], inv[0, 1], inv[1, 1]])


# --------------------------------------------------------------------------- SH

# The real SH basis with the Condon-Shortley phase, written from its closed forms.
Y1 = math.sqrt(3 / (4 * math.pi))  # Y_1m = -Y1 y, Y1 z, -Y1 x
Y2 = 0.5 * math.sqrt(15 / math.pi)  # Y_2,-2 = Y2 xy, Y_2,-1 = -Y2 yz, Y_2,1 = -Y2 xz
Y20 = 0.25 * math.sqrt(5 / math.pi)  # Y_2,0 = Y20 (3 z^2 - 1)
Y22 = 0.25 * math.sqrt(15 / math.pi)  # Y_2,2 = Y22 (x^2 - y^2)
R2 = 1 / math.sqrt(2)

SH_VALUES = [
    # (degree, coefficient index, direction, basis value there)
    pytest.param(1, 1, (0, 1, 0), -Y1, id="Y1-1 at +y"),
    pytest.param(1, 2, (0, 0, 1), Y1, id="Y10 at +z"),
    pytest.param(1, 3, (1, 0, 0), -Y1, id="Y11 at +x"),
    pytest.param(1, 3, (-2, 0, 0), Y1, id="Y11 at -x unnormalised"),
    pytest.param(1, 2, (1, 0, 0), 0.0, id="Y10 at +x"),
    pytest.param(2, 4, (R2, R2, 0), Y2 / 2, id="Y2-2 at x+y"),
    pytest.param(2, 5, (0, R2, R2), -Y2 / 2, id="Y2-1 at y+z"),
    pytest.param(2, 6, (0, 0, 1), 2 * Y20, id="Y20 at +z"),
    pytest.param(2, 6, (1, 0, 0), -Y20, id="Y20 at +x"),
    pytest.param(2, 7, (R2, 0, R2), -Y2 / 2, id="Y21 at x+z"),
    pytest.param(2, 8, (0, 1, 0), -Y22, id="Y22 at +y"),
]


@pytest.mark.parametrize("degree, index, direction, value", SH_VALUES)
def test_sh_basis_against_closed_forms(degree, index, direction, value):
    coeffs = torch.zeros(1, (degree + 1) ** 2, 3, dtype=torch.float64)
    coeffs[0, index] = torch.tensor([0.4, -0.2, 0.1], dtype=torch.float64)
    rgb = sh_to_rgb(degree, coeffs, torch.tensor([direction], dtype=torch.float64))[0]
    np.testing.assert_allclose(rgb.numpy(), 0.5 + value * np.array([0.4, -0.2, 0.1]), atol=1e-12)


def test_sh_degree_zero_is_the_constant_band():
    coeffs = torch.zeros(1, 16, 3, dtype=torch.float64)
    coeffs[0, 0] = 1.0
    coeffs[0, 1:] = 5.0  # higher bands are ignored at degree 0
    rgb = sh_to_rgb(0, coeffs, torch.tensor([[0.3, -0.2, 0.9]], dtype=torch.float64))[0]
    np.testing.assert_allclose(rgb.numpy(), 0.5 + 0.5 / math.sqrt(math.pi))
