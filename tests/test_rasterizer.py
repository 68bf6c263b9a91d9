"""The pure-torch rasterizer against a float64 per-pixel reference, finite differences, and
gsplat's own pure-torch projection and SH code."""

import math

import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _spherical_harmonics

from clm.render.base import View
from clm.render.projection import project, quat_to_rotmat
from clm.render.sh import sh_to_rgb
from clm.render.splats import SH_COEFFS, render_torch
from clm.render.torch_rasterizer import rasterize


def random_scene(n: int, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": ((torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([2.0, 1.5, 1.0])).to(dtype),
        "quats": torch.randn(n, 4, generator=g).to(dtype),
        "scales": torch.log(torch.rand(n, 3, generator=g) * 0.12 + 0.03).to(dtype),
        "opacities": (torch.randn(n, generator=g) * 1.5).to(dtype),
        "sh0": (torch.randn(n, 1, 3, generator=g) * 0.6).to(dtype),
        "shN": (torch.randn(n, 15, 3, generator=g) * 0.15).to(dtype),
    }


def camera(width: int, height: int, dtype=torch.float32) -> View:
    viewmat = torch.eye(4, dtype=dtype)
    angle = 0.2
    viewmat[:3, :3] = torch.tensor(
        [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]],
        dtype=dtype,
    )
    viewmat[:3, 3] = torch.tensor([0.1, -0.05, 3.0], dtype=dtype)
    f = 1.1 * width
    K = torch.tensor([[f, 0, width / 2 + 0.3], [0, f, height / 2 - 0.2], [0, 0, 1]], dtype=dtype)
    return View(viewmat, K, width, height)


def reference_render(params, view: View, degree: int, background) -> torch.Tensor:
    """Per-pixel, per-Gaussian loops in float64, straight from the 3DGS/gsplat definitions."""
    p = {k: v.double() for k, v in params.items()}
    vm, K = view.viewmat.double(), view.K.double()
    W, H = view.width, view.height
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    rot, trans = vm[:3, :3], vm[:3, 3]
    cam_center = -rot.T @ trans
    splats = []
    for i in range(p["means"].shape[0]):
        mc = rot @ p["means"][i] + trans
        x, y, z = mc
        if z < 0.01:
            continue
        q = p["quats"][i] / p["quats"][i].norm()
        R = quat_to_rotmat(q[None])[0]
        S = torch.diag(torch.exp(p["scales"][i]))
        cov = rot @ (R @ S @ S @ R.T) @ rot.T
        limx_p, limx_n = (W - cx) / fx + 0.3 * 0.5 * W / fx, cx / fx + 0.3 * 0.5 * W / fx
        limy_p, limy_n = (H - cy) / fy + 0.3 * 0.5 * H / fy, cy / fy + 0.3 * 0.5 * H / fy
        tx = z * torch.clamp(x / z, -limx_n, limx_p)
        ty = z * torch.clamp(y / z, -limy_n, limy_p)
        J = torch.stack(
            [
                torch.stack([fx / z, torch.zeros_like(z), -fx * tx / z**2]),
                torch.stack([torch.zeros_like(z), fy / z, -fy * ty / z**2]),
            ]
        )
        cov2 = J @ cov @ J.T + 0.3 * torch.eye(2, dtype=torch.float64)
        mean2 = torch.stack([fx * x / z + cx, fy * y / z + cy])
        opac = torch.sigmoid(p["opacities"][i])
        if opac < 1 / 255:
            continue
        extend = min(3.33, math.sqrt(2 * math.log(float(opac.detach()) * 255)))
        rx = math.ceil(extend * math.sqrt(float(cov2[0, 0].detach())))
        ry = math.ceil(extend * math.sqrt(float(cov2[1, 1].detach())))
        mx, my = float(mean2[0].detach()), float(mean2[1].detach())
        if mx + rx <= 0 or mx - rx >= W or my + ry <= 0 or my - ry >= H:
            continue
        coeffs = torch.cat([p["sh0"][i], p["shN"][i]])[None]
        color = sh_to_rgb(degree, coeffs, (p["means"][i] - cam_center)[None])[0]
        splats.append((float(z.detach()), i, mean2, torch.linalg.inv(cov2), opac, color))
    splats.sort(key=lambda s: (s[0], s[1]))
    rows = []
    for py in range(H):
        for px in range(W):
            pix = torch.tensor([px + 0.5, py + 0.5], dtype=torch.float64)
            T = torch.ones((), dtype=torch.float64)
            out = torch.zeros(3, dtype=torch.float64)
            for _, _, mean2, conic, opac, color in splats:
                d = mean2 - pix
                sigma = 0.5 * (d @ conic @ d)
                alpha = torch.clamp(opac * torch.exp(-sigma), max=0.999)
                if sigma < 0 or alpha < 1 / 255:
                    continue
                if T * (1 - alpha) <= 1e-4:
                    break
                out = out + color * alpha * T
                T = T * (1 - alpha)
            rows.append(out + T * background.double())
    return torch.stack(rows).reshape(H, W, 3)


@pytest.mark.parametrize("degree", [0, 3])
def test_matches_float64_reference_image_and_gradients(degree):
    params = random_scene(24, seed=1)
    view = camera(20, 14)
    bg = torch.tensor([0.1, 0.2, 0.3])
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    ours = render_torch(leaves, view, degree, bg).image
    ref_leaves = {k: v.double().clone().requires_grad_() for k, v in params.items()}
    ref = reference_render(ref_leaves, view, degree, bg)
    assert ours.dtype == torch.float32
    assert (ref > 0.05).any()  # the scene is not empty
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-5)

    weights = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (ours.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    for name in params:
        got, want = leaves[name].grad.double(), ref_leaves[name].grad
        if degree == 0 and name == "shN":
            assert got.abs().max() == 0
            continue
        scale = want.abs().max().clamp_min(1e-6)
        assert (got - want).abs().max() / scale < 2e-3, name


@pytest.mark.parametrize("degree", [1, 3])
def test_joined_sh_coefficients_are_read_in_place_of_the_attributes(degree):
    """Given the joined coefficients (a view of one packed leaf), the renderer reads them and
    not ``sh0``/``shN`` (NaN here): the image and the leaf's gradient match the float64
    reference's."""
    params = random_scene(24, seed=2)
    view, bg = camera(20, 14), torch.tensor([0.1, 0.2, 0.3])
    bands = (degree + 1) ** 2
    coeffs = torch.cat([params["sh0"], params["shN"][:, : bands - 1]], dim=1)
    packed = coeffs.reshape(24, -1).clone().requires_grad_()
    inputs = {k: params[k] for k in ("means", "quats", "scales", "opacities")}
    inputs |= {"sh0": torch.full_like(params["sh0"], math.nan)}
    inputs |= {"shN": torch.full_like(params["shN"], math.nan)}
    inputs[SH_COEFFS] = packed.view(24, bands, 3)
    ours = render_torch(inputs, view, degree, bg).image
    ref_leaves = {k: v.double().clone().requires_grad_() for k, v in params.items()}
    ref = reference_render(ref_leaves, view, degree, bg)
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-5)

    weights = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (ours.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    want = torch.cat([ref_leaves["sh0"].grad, ref_leaves["shN"].grad[:, : bands - 1]], dim=1)
    want = want.reshape(24, -1)
    assert (packed.grad.double() - want).abs().max() / want.abs().max() < 2e-3


def test_gradcheck_in_float64():
    params = random_scene(6, seed=5, dtype=torch.float64)
    view = camera(10, 8, dtype=torch.float64)
    bg = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    names = ["means", "scales", "opacities", "sh0", "quats"]

    def fn(*tensors):
        p = dict(params)
        p.update(dict(zip(names, tensors, strict=True)))
        return render_torch(p, view, 1, bg).image

    inputs = tuple(params[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_projection_matches_gsplat_torch_reference():
    params = random_scene(200, seed=7)
    view = camera(64, 48)
    scales = torch.exp(params["scales"])
    ours = project(
        params["means"],
        params["quats"],
        scales,
        torch.sigmoid(params["opacities"]),
        view.viewmat,
        view.K,
        view.width,
        view.height,
    )
    R = quat_to_rotmat(params["quats"])
    covars = R @ torch.diag_embed(scales**2) @ R.transpose(1, 2)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        params["means"], covars, view.viewmat[None], view.K[None], view.width, view.height
    )
    both = ours.visible & (radii[0] > 0).any(-1)
    assert both.sum() > 50
    torch.testing.assert_close(ours.means2d[both], means2d[0][both])
    torch.testing.assert_close(ours.depths[both], depths[0][both])
    torch.testing.assert_close(ours.conics[both], conics[0][both], rtol=1e-4, atol=1e-6)
    # Opacity-aware radii are never larger than gsplat's torch 3.33-sigma ones.
    assert (ours.radii[both] <= radii[0][both]).all()


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_gsplat_torch_reference(degree):
    g = torch.Generator().manual_seed(degree)
    coeffs = torch.randn(50, 16, 3, generator=g)
    dirs = torch.randn(50, 3, generator=g)
    want = torch.clamp_min(_spherical_harmonics(degree, dirs, coeffs) + 0.5, 0.0)
    torch.testing.assert_close(sh_to_rgb(degree, coeffs, dirs), want, rtol=1e-5, atol=1e-6)


def test_opaque_front_gaussian_hides_the_one_behind():
    """Transmittance: an opaque red disc in front of a green one leaves no green at its centre."""
    means2d = torch.tensor([[8.5, 8.5], [8.5, 8.5]])  # on the centre of pixel (8, 8)
    conics = torch.tensor([[0.05, 0.0, 0.05], [0.05, 0.0, 0.05]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    opac = torch.tensor([0.999, 0.999])
    radii = torch.tensor([[12, 12], [12, 12]], dtype=torch.int32)
    for depths, expect in ((torch.tensor([1.0, 2.0]), 0), (torch.tensor([2.0, 1.0]), 1)):
        image, alpha = rasterize(means2d, conics, colors, opac, depths, radii, 16, 16)
        centre = image[8, 8]
        assert centre.argmax() == expect
        assert centre[1 - expect] == 0  # T would drop below 1e-4: the pixel stops
        assert alpha[8, 8, 0] == pytest.approx(0.999)  # alpha is capped at 0.999
