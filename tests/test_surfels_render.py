"""The pure-torch 2DGS renderer against hand-computed footprints, a float64 per-pixel reference
built on gsplat's own pure-torch 2DGS projection, and finite differences."""

import math

import pytest
import torch
from gsplat.cuda._torch_impl import _spherical_harmonics
from gsplat.cuda._torch_impl_2dgs import _fully_fused_projection_2dgs

from clm.render.base import View
from clm.render.surfels import (
    EXTRA_CHANNELS,
    normals_from_depth,
    render_surfels_torch,
    split_extras,
    surfel_renderer,
)

C0 = 0.28209479177387814  # degree-0 SH basis value


def rotmat(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a (w, x, y, z) quaternion, written out here."""
    w, x, y, z = (q / q.norm()).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=q.dtype,
    )


def splats(means, log_scales, quats, logits, rgbs, dtype=torch.float64):
    n = len(means)
    rgb = torch.tensor(rgbs, dtype=dtype)
    return {
        "means": torch.tensor(means, dtype=dtype),
        "scales": torch.tensor(log_scales, dtype=dtype),
        "quats": torch.tensor(quats, dtype=dtype),
        "opacities": torch.tensor(logits, dtype=dtype),
        "sh0": ((rgb - 0.5) / C0)[:, None, :],
        "shN": torch.zeros(n, 15, 3, dtype=dtype),
    }


def head_on_view(size=32, f=50.0, dtype=torch.float64) -> View:
    """Identity pose; the optical axis meets the centre of pixel (15, 15)."""
    K = torch.tensor([[f, 0, 15.5], [0, f, 15.5], [0, 0, 1]], dtype=dtype)
    return View(torch.eye(4, dtype=dtype), K, size, size)


def expected_footprint(opacity, sigma_x, sigma_y, size=32):
    """Alpha of a fronto-parallel disc centred on pixel (15, 15): its own Gaussian (exact ray
    intersection) or gsplat's screen-space filter exp(-|d|²), whichever is larger."""
    d = torch.arange(size, dtype=torch.float64) - 15.0
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    on_plane = (dx / sigma_x) ** 2 + (dy / sigma_y) ** 2
    on_screen = 2.0 * (dx**2 + dy**2)
    alpha = (opacity * torch.exp(-0.5 * torch.minimum(on_plane, on_screen))).clamp(max=0.999)
    return torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


BG = torch.tensor([0.1, 0.5, 0.3], dtype=torch.float64)


def test_head_on_splat_footprint_and_colour():
    # z = 2, f = 50: sigma = f s / z = 4 px across, 2 px down.
    params = splats(
        [[0, 0, 2.0]], [[math.log(0.16), math.log(0.08)]], [[1, 0, 0, 0]], [1.0], [[0.9, 0.2, 0.4]]
    )
    out = render_surfels_torch(params, head_on_view(), 0, BG)
    alpha = out.alpha[..., 0]
    o = sigmoid(1.0)
    assert alpha[15, 15].item() == pytest.approx(o, rel=1e-12)
    torch.testing.assert_close(alpha, expected_footprint(o, 4.0, 2.0), atol=1e-12, rtol=0)
    rgb = torch.tensor([0.9, 0.2, 0.4], dtype=torch.float64)
    want = rgb * alpha[..., None] + BG * (1 - alpha[..., None])
    torch.testing.assert_close(out.image, want, atol=1e-12, rtol=0)
    assert out.image.shape == (32, 32, 3)
    assert out.ids.tolist() == [0]
    torch.testing.assert_close(out.means2d, torch.tensor([[15.5, 15.5]], dtype=torch.float64))
    assert out.radii.dtype == torch.int32
    assert out.radii.tolist() == [[math.ceil(3.33 * 4), math.ceil(3.33 * 2)]]

    # Rotated 90° about the view axis: the footprint's x and y extents swap.
    c = math.cos(math.pi / 4)
    params["quats"] = torch.tensor([[c, 0, 0, c]], dtype=torch.float64)
    turned = render_surfels_torch(params, head_on_view(), 0, BG).alpha[..., 0]
    torch.testing.assert_close(turned, alpha.T, atol=1e-9, rtol=0)
    assert (turned[15, :] > 0).sum() < (alpha[15, :] > 0).sum()


def test_alpha_is_capped_and_tiny_splats_get_the_screen_filter():
    params = splats(
        [[0, 0, 2.0]], [[math.log(0.16), math.log(0.16)]], [[1, 0, 0, 0]], [9.0], [[1, 1, 1]]
    )
    assert render_surfels_torch(params, head_on_view(), 0, BG).alpha[15, 15, 0] == 0.999
    # sigma 0.1 px: the splat's own Gaussian vanishes a pixel away, the filter exp(-d²) does not
    params["scales"] = torch.full((1, 2), math.log(0.004), dtype=torch.float64)
    alpha = render_surfels_torch(params, head_on_view(), 0, BG).alpha[..., 0]
    o = sigmoid(9.0)
    torch.testing.assert_close(alpha, expected_footprint(o, 0.1, 0.1), atol=1e-12, rtol=0)
    assert alpha[15, 16].item() == pytest.approx(o * math.exp(-1.0))


def test_depth_and_normals_of_a_splat_facing_a_turned_camera():
    q_cam = torch.tensor([0.9, 0.2, -0.3, 0.25], dtype=torch.float64)
    cam_to_world = rotmat(q_cam)
    centre = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = cam_to_world.T
    viewmat[:3, 3] = -cam_to_world.T @ centre
    view = View(viewmat, head_on_view().K, 32, 32)
    forward = cam_to_world[:, 2]  # the viewing axis in the world
    w, x, y, z = q_cam.tolist()
    q_flip = torch.tensor([-x, w, z, -y], dtype=torch.float64)  # q_cam then 180° about x
    torch.testing.assert_close(
        rotmat(q_flip),
        cam_to_world @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)),
    )
    for quat in (q_cam, q_flip):  # the splat's axis along or against the view: same normal
        params = splats(
            [(centre + 2.5 * forward).tolist()],
            [[math.log(0.1)] * 2],
            [quat.tolist()],
            [2.0],
            [[0.5, 0.5, 0.5]],
        )
        out = render_surfels_torch(params, view, 0, BG, depth=True, extras=True)
        _, depth, normals, distortion = split_extras(out.image)
        alpha = out.alpha[..., 0]
        covered = alpha > 0
        assert covered.sum() > 50 and not covered.all()
        torch.testing.assert_close(depth[covered], torch.full_like(depth[covered], 2.5))
        assert (depth[~covered] == 0).all()
        want = -forward * alpha[..., None]  # facing the camera, weighted by alpha
        torch.testing.assert_close(normals, want, atol=1e-12, rtol=0)
        assert (distortion == 0).all()  # one splat: nothing to spread


def test_two_splats_composite_front_to_back():
    a, b = 0.6, 0.7
    c_front, c_back = [0.9, 0.1, 0.1], [0.1, 0.8, 0.2]
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    params = splats(
        [[0, 0, 4.0], [0, 0, 2.0]],
        [[math.log(0.3)] * 2, [math.log(0.15)] * 2],
        [[1, 0, 0, 0], [0, 1, 0, 0]],
        [logit(b), logit(a)],
        [c_back, c_front],
    )
    out = render_surfels_torch(params, head_on_view(), 0, BG, extras=True)
    rgb, depth, normals, distortion = split_extras(out.image)
    front, back = (
        torch.tensor(c_front, dtype=torch.float64),
        torch.tensor(c_back, dtype=torch.float64),
    )
    w_front, w_back = a, (1 - a) * b
    want = w_front * front + w_back * back + (1 - a) * (1 - b) * BG
    torch.testing.assert_close(rgb[15, 15], want, atol=1e-12, rtol=0)
    alpha = 1 - (1 - a) * (1 - b)
    assert out.alpha[15, 15, 0].item() == pytest.approx(alpha)
    assert depth[15, 15].item() == pytest.approx((w_front * 2 + w_back * 4) / alpha)
    assert normals[15, 15].tolist() == pytest.approx([0, 0, -alpha])
    assert distortion[15, 15].item() == pytest.approx(2 * w_front * w_back * (4 - 2))


def test_extras_layout_and_no_background_in_extra_channels():
    params = splats(
        [[0.05, 0, 2.0]],
        [[math.log(0.1), math.log(0.05)]],
        [[1, 0.2, 0, 0]],
        [1.5],
        [[0.2, 0.4, 0.6]],
    )
    view, white = head_on_view(), torch.ones(3, dtype=torch.float64)
    plain = render_surfels_torch(params, view, 0, white)
    with_depth = render_surfels_torch(params, view, 0, white, depth=True)
    extras = render_surfels_torch(params, view, 0, white, extras=True)
    both = render_surfels_torch(params, view, 0, white, depth=True, extras=True)
    assert EXTRA_CHANNELS == 5
    assert plain.image.shape[-1] == 3 and with_depth.image.shape[-1] == 4
    assert extras.image.shape[-1] == both.image.shape[-1] == 3 + EXTRA_CHANNELS
    torch.testing.assert_close(extras.image, both.image, atol=0, rtol=0)
    torch.testing.assert_close(with_depth.image, extras.image[..., :4], atol=0, rtol=0)
    torch.testing.assert_close(plain.image, extras.image[..., :3], atol=0, rtol=0)
    rgb, depth, normals, distortion = split_extras(extras.image)
    empty = extras.alpha[..., 0] == 0
    assert empty.any()
    assert (rgb[empty] == 1).all()
    assert (depth[empty] == 0).all() and (normals[empty] == 0).all()
    assert (distortion[empty] == 0).all()
    with pytest.raises(ValueError):
        split_extras(with_depth.image)


def test_nothing_visible_gives_the_background():
    params = splats(
        [[0, 0, -2.0], [40.0, 0, 2.0]],
        [[0.0, 0.0]] * 2,
        [[1, 0, 0, 0]] * 2,
        [3.0, 3.0],
        [[1, 0, 0]] * 2,
    )
    params = {k: v.requires_grad_() for k, v in params.items()}
    out = render_surfels_torch(params, head_on_view(), 0, BG, extras=True)
    assert out.ids.numel() == 0 and out.radii.shape == (0, 2) and out.means2d.shape == (0, 2)
    torch.testing.assert_close(out.image[..., :3], BG.expand(32, 32, 3))
    assert (out.image[..., 3:] == 0).all() and (out.alpha == 0).all()


def reference_render(params, view: View, degree: int, background):
    """Per pixel, per splat, in float64, straight from gsplat's 2DGS kernel: gsplat's own torch
    projection, then for each pixel the splats in depth order; the image fits in one 16×16 tile,
    so every projected splat is evaluated at every pixel."""
    W, H = view.width, view.height
    assert W <= 16 and H <= 16
    scales = torch.cat([torch.exp(params["scales"]), torch.ones_like(params["scales"][:, :1])], 1)
    radii, means2d, depths, M, normals = _fully_fused_projection_2dgs(
        params["means"], params["quats"], scales, view.viewmat[None], view.K[None], W, H
    )
    radii, means2d, depths, M, normals = radii[0], means2d[0], depths[0], M[0], normals[0]
    visible = (radii > 0).all(-1).nonzero().squeeze(1).tolist()
    cam_to_world = torch.linalg.inv(view.viewmat)
    coeffs = torch.cat([params["sh0"], params["shN"]], dim=1)
    colors = torch.clamp_min(
        _spherical_harmonics(degree, params["means"] - cam_to_world[:3, 3], coeffs) + 0.5, 0
    )
    opac = torch.sigmoid(params["opacities"])
    order = sorted(visible, key=lambda i: (float(depths[i]), i))
    rgb, alpha_img, depth_img, normal_img, distort_img = [], [], [], [], []
    for py in range(H):
        for px in range(W):
            x, y = px + 0.5, py + 0.5
            T = 1.0
            c = torch.zeros(3, dtype=torch.float64)
            n_sum = torch.zeros(3, dtype=torch.float64)
            d_sum = dist = acc_wd = torch.zeros((), dtype=torch.float64)
            for i in order:
                h_u, h_v = x * M[i, 2] - M[i, 0], y * M[i, 2] - M[i, 1]
                cross = torch.linalg.cross(h_u, h_v)
                if cross[2] == 0:
                    continue
                s = cross[:2] / cross[2]
                g = min(s @ s, 2.0 * ((means2d[i] - torch.tensor([x, y])) ** 2).sum())
                alpha = torch.clamp(opac[i] * torch.exp(-0.5 * g), max=0.999)
                if alpha < 1 / 255:
                    continue
                if T * (1 - alpha) <= 1e-4:
                    break
                w = alpha * T
                c = c + w * colors[i]
                dist = dist + 2 * w * (depths[i] * (1 - T) - acc_wd)
                acc_wd = acc_wd + w * depths[i]
                d_sum = d_sum + w * depths[i]
                n_sum = n_sum + w * normals[i]
                T = T * (1 - alpha)
            alpha_total = torch.as_tensor(1 - T, dtype=torch.float64)
            rgb.append(c + T * background)
            alpha_img.append(alpha_total)
            depth_img.append(d_sum / alpha_total.clamp_min(1e-10))
            normal_img.append(cam_to_world[:3, :3] @ n_sum)
            distort_img.append(dist)
    image = torch.cat(
        [
            torch.stack(rgb).reshape(H, W, 3),
            torch.stack(depth_img).reshape(H, W, 1),
            torch.stack(normal_img).reshape(H, W, 3),
            torch.stack(distort_img).reshape(H, W, 1),
        ],
        dim=-1,
    )
    return image, torch.stack(alpha_img).reshape(H, W, 1), visible, means2d, radii


def random_scene(n: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "means": ((torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([1.2, 0.9, 0.8])).to(dtype),
        "quats": torch.randn(n, 4, generator=g).to(dtype),
        "scales": torch.log(torch.rand(n, 2, generator=g) * 0.25 + 0.05).to(dtype),
        "opacities": (torch.randn(n, generator=g) * 1.5).to(dtype),
        "sh0": (torch.randn(n, 1, 3, generator=g) * 0.6).to(dtype),
        "shN": (torch.randn(n, 15, 3, generator=g) * 0.15).to(dtype),
    }


def turned_view(width: int, height: int, dtype=torch.float64) -> View:
    viewmat = torch.eye(4, dtype=dtype)
    a = 0.25
    viewmat[:3, :3] = torch.tensor(
        [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=dtype
    )
    viewmat[:3, 3] = torch.tensor([0.05, -0.03, 2.5], dtype=dtype)
    f = 1.2 * width
    K = torch.tensor([[f, 0, width / 2 + 0.3], [0, f, height / 2 - 0.2], [0, 0, 1]], dtype=dtype)
    return View(viewmat, K, width, height)


@pytest.mark.parametrize(("seed", "opaque"), [(0, False), (1, False), (2, True)])
def test_matches_float64_per_pixel_reference(seed, opaque):
    params = random_scene(12, seed)
    if opaque:  # layers of alpha 0.999: pixels stop at the 1e-4 transmittance threshold
        params["opacities"] = torch.full((12,), 7.0, dtype=torch.float64)
        params["scales"] = params["scales"] + 0.7
    view = turned_view(16, 12)
    ref, ref_alpha, visible, ref_means2d, ref_radii = reference_render(params, view, 2, BG)
    out = render_surfels_torch(params, view, 2, BG, extras=True)
    assert out.ids.tolist() == visible and len(visible) >= 8
    assert (ref_alpha > 0.3).any()
    assert (ref_alpha > 0.9985).any() == opaque
    torch.testing.assert_close(out.means2d, ref_means2d[visible])
    assert out.radii.tolist() == ref_radii[visible].tolist()
    torch.testing.assert_close(out.alpha, ref_alpha, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.image, ref, atol=1e-9, rtol=1e-9)
    assert out.image[..., 7].abs().max() > 1e-3  # distortion is exercised


def test_projection_matches_gsplat_torch_reference_at_scale():
    params = random_scene(300, seed=4, dtype=torch.float32)
    params["means"] = params["means"] * 4
    view = turned_view(96, 64, dtype=torch.float32)
    out = render_surfels_torch(params, view, 3, BG.float())
    scales = torch.cat([torch.exp(params["scales"]), torch.ones(300, 1)], 1)
    radii, means2d, _, _, _ = _fully_fused_projection_2dgs(
        params["means"], params["quats"], scales, view.viewmat[None], view.K[None], 96, 64
    )
    visible = (radii[0] > 0).all(-1).nonzero().squeeze(1)
    assert out.ids.tolist() == visible.tolist() and 50 < len(visible) < 300
    torch.testing.assert_close(out.means2d, means2d[0][visible], atol=1e-4, rtol=1e-5)
    assert (out.radii - radii[0][visible]).abs().max() <= 1  # ceil of float rounding


def test_gradcheck_in_float64():
    params = splats(
        [[0.1, -0.1, 0.2], [-0.25, 0.15, -0.3], [0.3, 0.25, 0.4]],
        [[math.log(0.6), math.log(0.4)], [math.log(0.5), math.log(0.7)], [math.log(0.3)] * 2],
        [[0.9, 0.3, -0.2, 0.1], [0.8, -0.1, 0.4, 0.3], [1.0, 0.2, 0.1, -0.3]],
        [0.8, 1.2, 0.3],
        [[0.9, 0.2, 0.1], [0.1, 0.7, 0.3], [0.4, 0.4, 0.9]],
    )
    params["shN"] = torch.randn(3, 15, 3, generator=torch.Generator().manual_seed(0)).double() * 0.2
    view = turned_view(8, 8)
    names = ["means", "scales", "quats", "opacities", "sh0"]

    def fn(*tensors):
        p = {**params, **dict(zip(names, tensors, strict=True))}
        out = render_surfels_torch(p, view, 1, BG, extras=True)
        return out.image, out.alpha

    inputs = tuple(params[n].clone().requires_grad_() for n in names)
    out = render_surfels_torch(params, view, 1, BG, extras=True)
    assert out.ids.numel() == 3 and (out.alpha > 0.2).sum() > 10
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_means2d_grad_is_the_image_plane_gradient():
    """For a fronto-parallel splat (whose screen filter never wins), moving it by dx in camera
    x moves T[0, 2] by f dx, so the densification signal ∂L/∂T[0, 2] · z is ∂L/∂x · z / f."""
    params = splats(
        [[0.07, -0.05, 2.0]],
        [[math.log(0.12), math.log(0.09)]],
        [[1, 0, 0, 0]],
        [0.5],
        [[0.7, 0.3, 0.2]],
    )
    params = {k: v.requires_grad_() for k, v in params.items()}
    out = render_surfels_torch(params, head_on_view(), 0, BG)
    assert out.means2d.requires_grad and out.means2d.is_leaf
    weights = torch.rand(out.image.shape, generator=torch.Generator().manual_seed(0)).double()
    (out.image * weights).sum().backward()
    want = params["means"].grad[0, :2] * 2.0 / 50.0
    assert want.abs().min() > 1e-4
    torch.testing.assert_close(out.means2d.grad[0], want, atol=1e-12, rtol=1e-9)


def test_normals_from_depth_of_a_tilted_plane():
    view = turned_view(24, 18)
    n_cam = torch.nn.functional.normalize(
        torch.tensor([0.3, -0.2, -1.0], dtype=torch.float64), dim=0
    )
    K = view.K
    u = (torch.arange(24, dtype=torch.float64) + 0.5 - K[0, 2]) / K[0, 0]
    v = (torch.arange(18, dtype=torch.float64) + 0.5 - K[1, 2]) / K[1, 1]
    rays = torch.stack(
        [u.expand(18, 24), v[:, None].expand(18, 24), torch.ones(18, 24, dtype=torch.float64)],
        dim=-1,
    )
    depth = -2.0 / (rays @ n_cam)  # the plane n · X = -2 (its normal faces the camera)
    assert (depth > 0).all()
    normals = normals_from_depth(depth, view)
    want = view.viewmat[:3, :3].T @ n_cam
    torch.testing.assert_close(normals[1:-1, 1:-1], want.expand(16, 22, 3), atol=1e-9, rtol=0)
    border = torch.ones(18, 24, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert (normals[border] == 0).all()


def test_surfel_renderer_picks_the_twin_off_cuda():
    params = splats([[0, 0, 2.0]], [[math.log(0.1)] * 2], [[1, 0, 0, 0]], [1.0], [[1, 0, 0]])
    render = surfel_renderer(torch.device("cpu"), extras=True)
    out = render(params, head_on_view(), 0, BG)
    assert out.image.shape[-1] == 3 + EXTRA_CHANNELS
    assert surfel_renderer(torch.device("cpu")) is render_surfels_torch
