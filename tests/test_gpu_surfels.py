"""GPU tests of the 2DGS renderer (``pytest -m gpu`` on a CUDA machine): gsplat's CUDA kernels
against the pure-torch twin (image, alpha, extra channels, every gradient), and against gsplat's
own ``rasterization_2dgs``.

Pixel values are compared to float tolerance almost everywhere; a pair whose alpha sits on the
1/255 threshold (or a pixel on the 1e-4 transmittance stop) may fall either way in float32 on
the two backends, so a few elements are allowed a larger (still small) difference.
"""

import math
import warnings

import pytest
import torch

from clm.render.base import RenderOutput, View
from clm.render.surfels import (
    EXTRA_CHANNELS,
    render_surfels_gsplat,
    render_surfels_torch,
    split_extras,
    surfel_renderer,
)

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
NAMES = ("means", "scales", "quats", "opacities", "sh0", "shN")


def random_surfels(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Surfels from sub-pixel (the screen filter wins) to a few dozen pixels across."""
    g = torch.Generator().manual_seed(seed)
    return {
        "means": (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([3.0, 2.0, 2.0]),
        "scales": torch.log(torch.rand(n, 2, generator=g) * 0.1 + 0.003),
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g) * 1.5,
        "sh0": torch.randn(n, 1, 3, generator=g) * 0.5,
        "shN": torch.randn(n, 15, 3, generator=g) * 0.1,
    }


def camera(width: int = 96, height: int = 64) -> View:
    viewmat = torch.eye(4)
    a = 0.2
    viewmat[:3, :3] = torch.tensor(
        [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]]
    )
    viewmat[:3, 3] = torch.tensor([0.1, -0.05, 3.0])
    f = 1.1 * width
    K = torch.tensor([[f, 0, width / 2 + 0.3], [0, f, height / 2 - 0.2], [0, 0, 1.0]])
    return View(viewmat, K, width, height)


def leaves(params, device):
    return {k: v.to(device).clone().requires_grad_() for k, v in params.items()}


def assert_mostly_close(got, want, atol, frac=0.999, worst=0.02):
    """``got`` within ``atol`` of ``want`` in all but a sliver of elements, and within
    ``worst`` everywhere (threshold flips: one pair's alpha of about 1/255)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape
    diff = (got - want).abs()
    assert (diff <= atol).double().mean() >= frac, f"{(diff > atol).sum()} elements off"
    assert diff.max() <= worst, diff.max()


def assert_grad_close(got, want, name, rtol=2e-3):
    """Relative error of the whole gradient (its norm), so that a few threshold flips and
    float32 atomics do not count, but a wrong term would."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert want.norm() > 0, name
    err = (got - want).norm() / want.norm()
    assert err < rtol, f"{name}: relative error {err:.2e}"


def loss_of(out, weights):
    """A loss touching every output: RGB, alpha, and (when rendered) the extra channels; the
    depth only where alpha is high, as expected depth divides by alpha."""
    image = out.image
    w = weights[..., : image.shape[-1]].to(image.device)
    if image.shape[-1] > 3:
        solid = (out.alpha.detach() > 0.5).to(image.dtype)
        w = torch.cat([w[..., :3], w[..., 3:4] * solid, w[..., 4:]], dim=-1)
    return (image * w).sum() + (out.alpha * weights[..., -1:].to(image.device)).sum()


@pytest.mark.parametrize(("depth", "extras"), [(False, False), (True, False), (False, True)])
def test_gsplat_matches_torch_twin(depth, extras):
    params, view = random_surfels(400, seed=0), camera()
    bg = torch.tensor([0.2, 0.4, 0.6])
    cpu, gpu = leaves(params, "cpu"), leaves(params, CUDA)
    want = render_surfels_torch(cpu, view, 3, bg, depth=depth, extras=extras)
    got = render_surfels_gsplat(gpu, view.to(CUDA), 3, bg.to(CUDA), depth=depth, extras=extras)

    channels = 3 + (EXTRA_CHANNELS if extras else int(depth))
    assert got.image.shape == want.image.shape == (view.height, view.width, channels)
    assert torch.equal(got.ids.cpu(), want.ids)
    assert 100 < want.ids.numel() < 400
    assert got.radii.dtype == torch.int32 and got.radii.shape == (want.ids.numel(), 2)
    assert (got.radii.cpu() - want.radii).abs().max() <= 1  # ceil of float rounding
    assert (got.radii.cpu() == want.radii).double().mean() > 0.99
    torch.testing.assert_close(got.means2d.detach().cpu(), want.means2d, atol=1e-3, rtol=1e-5)

    assert_mostly_close(got.alpha, want.alpha, atol=1e-4)
    assert_mostly_close(got.image[..., :3], want.image[..., :3], atol=1e-4)
    assert (want.alpha > 0.5).any()
    if depth or extras:  # expected depth, compared where it is not a ratio of tiny numbers
        solid = (want.alpha[..., 0] > 0.05).cpu()
        d_got, d_want = got.image[..., 3].cpu()[solid], want.image[..., 3][solid]
        assert_mostly_close(d_got / d_want, torch.ones_like(d_want), atol=1e-4)
    if extras:
        _, _, n_got, dist_got = split_extras(got.image)
        _, _, n_want, dist_want = split_extras(want.image)
        assert_mostly_close(n_got, n_want, atol=1e-4)
        scale = dist_want.abs().max()
        assert scale > 1e-3
        assert_mostly_close(dist_got / scale, dist_want / scale, atol=1e-4)

    weights = torch.rand(view.height, view.width, 9, generator=torch.Generator().manual_seed(1))
    loss_of(got, weights).backward()
    loss_of(want, weights).backward()
    for name in NAMES:
        assert_grad_close(gpu[name].grad, cpu[name].grad, name)
    assert got.means2d.grad is not None and want.means2d.grad is not None
    # The densification signal sums every pixel's gradient of the splat's screen position;
    # gsplat adds them with float32 atomics in no fixed order, and a pair on the 1/255 alpha
    # threshold flips it whole: measured 2e-3 to 6e-3 on the H200, against 1e-2 here.
    assert_grad_close(got.means2d.grad, want.means2d.grad, "means2d (densification)", 1e-2)


def test_torch_twin_runs_on_cuda():
    params, view = random_surfels(200, seed=2), camera(64, 48)
    bg = torch.tensor([0.0, 0.5, 1.0])
    cpu, gpu = leaves(params, "cpu"), leaves(params, CUDA)
    want = render_surfels_torch(cpu, view, 3, bg, extras=True)
    got = render_surfels_torch(gpu, view.to(CUDA), 3, bg.to(CUDA), extras=True)
    assert torch.equal(got.ids.cpu(), want.ids)
    assert_mostly_close(got.image, want.image, atol=1e-4)
    weights = torch.rand(48, 64, 9, generator=torch.Generator().manual_seed(3))
    loss_of(got, weights).backward()
    loss_of(want, weights).backward()
    for name in NAMES:
        assert_grad_close(gpu[name].grad, cpu[name].grad, name)


def test_gsplat_path_matches_gsplat_rasterization_2dgs():
    """Our stage-by-stage call (packed) equals gsplat's own function (non-packed: in 1.5.3 its
    packed mode does not combine with SH colours), image, extras and parameter gradients."""
    from gsplat import rasterization_2dgs

    params, view = random_surfels(300, seed=4), camera()
    bg = torch.tensor([0.3, 0.3, 0.3], device=CUDA)
    ours_p, theirs_p = leaves(params, CUDA), leaves(params, CUDA)
    view_c = view.to(CUDA)
    ours = render_surfels_gsplat(ours_p, view_c, 3, bg, extras=True)
    scales = torch.exp(theirs_p["scales"])
    colors, alpha, normals, _, distort, _, meta = rasterization_2dgs(
        means=theirs_p["means"],
        quats=theirs_p["quats"],
        scales=torch.cat([scales, torch.ones_like(scales[:, :1])], dim=1),
        opacities=torch.sigmoid(theirs_p["opacities"]),
        colors=torch.cat([theirs_p["sh0"], theirs_p["shN"]], dim=1),
        viewmats=view_c.viewmat[None],
        Ks=view_c.K[None],
        width=view.width,
        height=view.height,
        sh_degree=3,
        packed=False,
        render_mode="RGB+ED",
        distloss=True,
    )
    visible = (meta["radii"][0] > 0).all(-1).nonzero().squeeze(1)
    assert torch.equal(ours.ids, visible)
    torch.testing.assert_close(ours.radii, meta["radii"][0][visible])
    torch.testing.assert_close(ours.means2d.detach(), meta["means2d"][0][visible].detach())
    theirs_image = torch.cat(
        [colors[0][..., :3] + (1 - alpha[0]) * bg, colors[0][..., 3:4], normals[0], distort[0]],
        dim=-1,
    )
    assert_mostly_close(ours.alpha, alpha[0], atol=1e-5)
    assert_mostly_close(ours.image[..., :3], theirs_image[..., :3], atol=1e-5)
    assert_mostly_close(ours.image[..., 4:], theirs_image[..., 4:], atol=1e-4)

    weights = torch.rand(view.height, view.width, 9, generator=torch.Generator().manual_seed(5))
    loss_of(ours, weights).backward()
    theirs = RenderOutput(theirs_image, alpha[0], meta["means2d"], meta["radii"], visible)
    loss_of(theirs, weights).backward()
    for name in NAMES:
        assert_grad_close(ours_p[name].grad, theirs_p[name].grad, name, rtol=1e-4)

    # gsplat's own densification output reads the ray-transform gradient while other threads
    # still add to it (RasterizeToPixels2DGSBwd.cu); report how far it is from the full sum.
    theirs_dens = meta["gradient_2dgs"].grad[0][visible]
    err = (theirs_dens - ours.means2d.grad).norm() / ours.means2d.grad.norm()
    warnings.warn(f"gsplat gradient_2dgs vs full-sum densification signal: {err:.2e}", stacklevel=1)


def test_gsplat_2dgs_kernels_ignore_the_third_scale():
    from gsplat import fully_fused_projection_2dgs

    params, view = random_surfels(100, seed=6), camera()
    view_c = view.to(CUDA)
    results = []
    for third in (1.0, 7.0):
        scales = torch.exp(params["scales"]).to(CUDA)
        scales = torch.cat([scales, torch.full_like(scales[:, :1], third)], 1).requires_grad_()
        out = fully_fused_projection_2dgs(
            params["means"].to(CUDA),
            params["quats"].to(CUDA),
            scales,
            view_c.viewmat[None],
            view_c.K[None],
            view.width,
            view.height,
            packed=True,
        )
        transforms, normals = out[6], out[7]
        (transforms.sum() + normals.sum()).backward()
        assert (scales.grad[:, 2] == 0).all()
        results.append(out)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_nothing_visible_gives_the_background():
    params = random_surfels(50, seed=7)
    params["means"][:, 2] = -10.0  # all behind the camera
    gpu = leaves(params, CUDA)
    bg = torch.tensor([0.1, 0.2, 0.3], device=CUDA)
    out = render_surfels_gsplat(gpu, camera().to(CUDA), 3, bg, extras=True)
    assert out.ids.numel() == 0
    torch.testing.assert_close(out.image[..., :3], bg.expand(64, 96, 3))
    assert (out.image[..., 3:] == 0).all() and (out.alpha == 0).all()
    out.image.sum().backward()  # must not fail


def test_surfel_renderer_picks_gsplat_on_cuda():
    assert surfel_renderer(CUDA) is render_surfels_gsplat
    render = surfel_renderer(CUDA, depth=True)
    out = render(
        leaves(random_surfels(20, 8), CUDA), camera().to(CUDA), 3, torch.zeros(3, device=CUDA)
    )
    assert out.image.shape[-1] == 4
