"""The culling bounds against the projections they are proven for.

``surfel``: every 2D Gaussian splat gsplat 1.5.3's 2DGS projection keeps for a camera (or a
window of one, as :class:`PieceCuller` culls it) must keep that camera's bit. The reference here
is written from gsplat's CUDA source (``Projection2DGSFused.cu`` / ``Projection2DGSPacked.cu``),
not from the culler: in float64 (the exact computation) and in float32 (gsplat's own rounding).

``ellipsoid``: the default is the 3DGS bound as it was, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from clm.errors import ClmError
from clm.offload.culling import (
    MIN_OPACITY_LOGIT,
    Culler,
    cull_bits_torch,
    pack_cameras,
    unpack_bits,
)
from clm.offload.pieces import PieceCuller, whole
from clm.render.base import View

CPU = torch.device("cpu")
ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat's rasterizers skip alpha below this at every pixel


# --- gsplat 1.5.3's 2DGS projection, from its CUDA source


def gsplat_quat_to_rotmat(quats: Tensor) -> Tensor:
    """``quat_to_rotmat`` of gsplat's Utils.cuh: (w, x, y, z), normalised, ``[N, 3, 3]``."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(-1, 3, 3)


def gsplat_2dgs_conic(
    means: Tensor, quats: Tensor, scales: Tensor, view: View, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(depth, distance, mean2d [N, 2], half_extend [N, 2])`` as gsplat's 2DGS projection
    computes them in ``dtype``: the centre and squared half-width of the box of the 1σ circle's
    image (``scales`` activated; a third column is ignored, as gsplat does)."""
    R = view.viewmat[:3, :3].to(dtype)
    t = view.viewmat[:3, 3].to(dtype)
    K = view.K.to(dtype)
    means, quats, scales = means.to(dtype), quats.to(dtype), scales.to(dtype)
    mean_c = means @ R.T + t  # posW2C
    # RS_camera = R * quat_to_rotmat(quat) * diag(s0, s1, 1): its first two columns.
    rs = R @ gsplat_quat_to_rotmat(quats)
    u = rs[:, :, 0] * scales[:, 0:1]
    v = rs[:, :, 1] * scales[:, 1:2]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]

    def row(f: Tensor, c: Tensor, axis: int) -> Tensor:
        """A row of K·WH, WH = [u, v, mean_c] (what the kernel calls M0 / M1)."""
        cols = [f * w[:, axis] + c * w[:, 2] for w in (u, v, mean_c)]
        return torch.stack(cols, dim=-1)

    M0, M1 = row(fx, cx, 0), row(fy, cy, 1)
    M2 = torch.stack([u[:, 2], v[:, 2], mean_c[:, 2]], dim=-1)
    temp_point = torch.tensor([1.0, 1.0, -1.0], dtype=dtype)

    def sum3(a: Tensor) -> Tensor:
        return a[:, 0] + a[:, 1] + a[:, 2]

    distance = sum3(temp_point * M2 * M2)
    f = (1 / distance)[:, None] * temp_point
    mean2d = torch.stack([sum3(f * M0 * M2), sum3(f * M1 * M2)], dim=-1)
    temp = torch.stack([sum3(f * M0 * M0), sum3(f * M1 * M1)], dim=-1)
    half_extend = mean2d * mean2d - temp
    return mean_c[:, 2].double(), distance, mean2d.double(), half_extend.double()


def gsplat_2dgs_boxes(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    view: View,
    dtype: torch.dtype,
    near: float = 0.01,
    far: float = 1e10,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(projected, mean2d [N, 2], radius [N, 2])`` as gsplat's 2DGS projection computes them,
    in ``dtype``, for the whole view (no in-image test yet).

    ``projected``: between the planes, in the union of the fused kernel's test (``near < z <
    far``) and the packed one's (``near <= z <= far``), with a radius; a splat with ``distance
    == 0`` is counted as projected too, since the fused kernel then returns without writing its
    (uninitialised) radii.
    """
    z, distance, mean2d, half_extend = gsplat_2dgs_conic(means, quats, scales, view, dtype)
    # ceil(3.33f * sqrt(max(1e-4, half_extend))): the max and sqrt in double.
    extent = torch.sqrt(torch.clamp(half_extend, min=1e-4))
    radius = torch.ceil(float(torch.tensor(3.33, dtype=torch.float32)) * extent)
    between = (z >= near) & (z <= far)
    projected = between & ((radius > 0).any(-1) | (distance == 0))
    return projected, mean2d, radius


def gsplat_2dgs_keeps(
    means: Tensor, quats: Tensor, scales: Tensor, view: View, dtype: torch.dtype, window=None
) -> Tensor:
    """``[N]`` bool: gsplat's 2DGS projection gives the splat a radius (its box meets the image),
    and, for ``window = (x0, y0, w, h)``, its box also meets that (tile-aligned) window, as the
    tile intersection of a whole-view render tests it."""
    projected, mean2d, radius = gsplat_2dgs_boxes(means, quats, scales, view, dtype)
    lo, hi = mean2d - radius, mean2d + radius
    keep = projected & ~(
        (hi[:, 0] <= 0) | (lo[:, 0] >= view.width) | (hi[:, 1] <= 0) | (lo[:, 1] >= view.height)
    )
    keep |= projected & torch.isnan(mean2d).any(-1)  # NaN fails all of gsplat's "outside" tests
    if window is not None:
        x0, y0, w, h = window
        keep &= (hi[:, 0] > x0) & (lo[:, 0] < x0 + w) & (hi[:, 1] > y0) & (lo[:, 1] < y0 + h)
    return keep


# --- scenes


def make_view(
    width: int, height: int, fx: float, fy: float, cx: float, cy: float, seed: int
) -> View:
    """A camera at a random pose (OpenCV axes)."""
    g = torch.Generator().manual_seed(seed)
    rot, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    rot = rot * torch.sign(torch.det(rot))
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = rot
    viewmat[:3, 3] = torch.randn(3, generator=g, dtype=torch.float64) * 3
    K = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=torch.float64)
    return View(viewmat.float(), K.float(), width, height)


VIEWS = [
    make_view(640, 480, 500.0, 500.0, 320.0, 240.0, seed=1),
    make_view(320, 240, 1200.0, 1100.0, 40.0, 200.0, seed=2),  # narrow, off-centre
    make_view(800, 600, 250.0, 260.0, 410.0, 290.0, seed=3),  # wide
    make_view(1920, 1080, 1500.0, 1500.0, 960.0, 540.0, seed=4),  # large: float32 rounding
]


def splats_around(view: View, n: int, seed: int) -> dict[str, Tensor]:
    """Surfels placed through ``view``'s pixels and far beyond them, from behind the camera to
    far away, most near the camera or off-screen; anisotropic, some larger than their depth.
    ``scales`` has a third column gsplat's 2DGS ignores."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    depth = torch.exp(torch.empty(n, dtype=d).uniform_(math.log(3e-3), math.log(300), generator=g))
    behind = torch.rand(n, generator=g, dtype=d) < 0.1
    depth = torch.where(behind, -torch.rand(n, generator=g, dtype=d) * 5, depth)
    px = (torch.rand(n, generator=g, dtype=d) * 4 - 1.5) * view.width
    py = (torch.rand(n, generator=g, dtype=d) * 4 - 1.5) * view.height
    K = view.K.double()
    cam = torch.stack(
        [(px - K[0, 2]) / K[0, 0] * depth.abs(), (py - K[1, 2]) / K[1, 1] * depth.abs(), depth], -1
    )
    vm = view.viewmat.double()
    means = (cam - vm[:3, 3]) @ vm[:3, :3]  # R^T (p - t)
    base = torch.log(depth.abs().clamp_min(1e-3))[:, None]
    log_scales = base + torch.empty(n, 3, dtype=d).uniform_(-9.0, 0.7, generator=g)
    return {
        "means": means.float(),
        "scales": log_scales.float(),
        "quats": torch.randn(n, 4, generator=g).float(),
        "opacities": (torch.randn(n, generator=g, dtype=d) * 3).float(),
    }


def scene(n_per_view: int = 6000) -> dict[str, Tensor]:
    parts = [splats_around(v, n_per_view, seed=10 + k) for k, v in enumerate(VIEWS)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def required(params: dict[str, Tensor], view: View, dtype: torch.dtype, window=None) -> Tensor:
    """Splats gsplat's 2DGS render may draw for ``view`` (or its window): projected with a radius,
    and opaque enough for its rasterizer's 1/255 alpha threshold."""
    keep = gsplat_2dgs_keeps(
        params["means"].double(),
        params["quats"].double(),
        torch.exp(params["scales"].double()),
        view,
        dtype,
        window,
    )
    return keep & (torch.sigmoid(params["opacities"].double()) >= ALPHA_THRESHOLD)


def culled_bits(culler: Culler, params: dict[str, Tensor], views) -> Tensor:
    """``[views, N]`` bool: the culler's bits."""
    result = culler.cull(params["means"], params["scales"], params["opacities"], views)
    vis = torch.zeros(
        len(views), params["means"].shape[0], dtype=torch.bool, device=result.ids.device
    )
    vis[:, result.ids] = result.vis
    return vis


# --- the reference's own check


def test_reference_box_is_the_box_of_the_projected_one_sigma_circle():
    """The reference's centre and half-width (before gsplat's 3.33 and rounding) bound the
    projected 1σ circle tightly, for splats wholly in front of the camera."""
    view = VIEWS[0]
    params = splats_around(view, 3000, seed=5)
    means, quats = params["means"].double(), params["quats"].double()
    scales = torch.exp(params["scales"].double())
    vm = view.viewmat.double()
    mean_c = means @ vm[:3, :3].T + vm[:3, 3]
    rs = vm[:3, :3] @ gsplat_quat_to_rotmat(quats)
    u, v = rs[:, :, 0] * scales[:, :1], rs[:, :, 1] * scales[:, 1:2]
    angles = torch.linspace(0, 2 * math.pi, 4097, dtype=torch.float64)[:-1]
    pts = (
        mean_c[:, None]
        + torch.cos(angles)[None, :, None] * u[:, None]
        + (torch.sin(angles)[None, :, None] * v[:, None])
    )  # [N, A, 3]
    front = (pts[..., 2] > 0.05 * pts[..., 2].abs().amax(-1, keepdim=True)).all(-1)
    front &= mean_c[:, 2] > 0.01
    assert front.sum() > 500
    K = view.K.double()
    pix = torch.stack(
        [
            K[0, 0] * pts[..., 0] / pts[..., 2] + K[0, 2],
            K[1, 1] * pts[..., 1] / pts[..., 2] + K[1, 2],
        ],
        -1,
    )
    _, _, mean2d, half_extend = gsplat_2dgs_conic(means, quats, scales, view, torch.float64)
    lo, hi = pix.amin(1), pix.amax(1)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    size = (half.abs().amax(-1) + 1)[:, None]
    assert ((mean2d - centre).abs() / size)[front].max() < 1e-4
    assert ((half_extend.sqrt() - half).abs() / size)[front].max() < 1e-4


# --- surfel: zero misses


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["exact", "float32"])
def test_surfel_bound_keeps_every_splat_gsplat_2dgs_keeps(dtype, capsys):
    params = scene()
    n = params["means"].shape[0]
    vis = culled_bits(Culler(CPU, bound="surfel", chunk=1 << 12), params, VIEWS)
    lines = []
    for c, view in enumerate(VIEWS):
        need = required(params, view, dtype)
        missed = need & ~vis[c]
        assert not missed.any(), f"camera {c}: {int(missed.sum())} splats gsplat draws are culled"
        dropped_by_gsplat = ~need
        culled = ~vis[c]
        share = float((culled & dropped_by_gsplat).sum() / dropped_by_gsplat.sum())
        lines.append(
            f"camera {c} ({view.width}x{view.height}): gsplat keeps {int(need.sum())}/{n}, "
            f"the bound keeps {int(vis[c].sum())}; culled {float(culled.float().mean()):.3f} of "
            f"all, {share:.3f} of those gsplat drops"
        )
        assert need.sum() > 300  # the scene does reach the image
        # Most of what gsplat drops (off-screen, behind, transparent) is culled.
        assert share > 0.8, lines[-1]
        assert vis[c].sum() < 2 * need.sum(), lines[-1]
    with capsys.disabled():
        print(f"\nsurfel bound ({dtype}):\n  " + "\n  ".join(lines))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["exact", "float32"])
def test_surfel_bound_keeps_what_gsplat_draws_in_a_window(dtype, capsys):
    """A window of a view, culled as :class:`PieceCuller` culls it: every splat whose
    whole-view box meets the window is kept."""
    params = scene()
    culler = PieceCuller(CPU, bound="surfel", chunk=1 << 12)
    lines = []
    for c in (0, 3):
        view = VIEWS[c]
        piece = whole(view)
        windows = [
            piece.part(128, 96, 288, 224),  # inside
            piece.part(0, 0, 64, 48),  # a corner
            piece.part(view.width - 48, 16, view.width, view.height),  # right edge, partial tile
        ]
        vis = culled_bits(culler, params, windows)
        for k, w in enumerate(windows):
            need = required(params, view, dtype, window=(w.x0, w.y0, w.width, w.height))
            missed = need & ~vis[k]
            assert not missed.any(), f"camera {c} window {k}: {int(missed.sum())} culled"
            lines.append(
                f"camera {c} window {w.width}x{w.height}@({w.x0},{w.y0}): gsplat draws "
                f"{int(need.sum())}, the bound keeps {int(vis[k].sum())}"
            )
        assert vis.sum(1).max() < culled_bits(culler, params, [view]).sum()  # windows cull more
    with capsys.disabled():
        print(f"\nsurfel bound in windows ({dtype}):\n  " + "\n  ".join(lines))


def edge_splats(view: View, n: int, seed: int) -> dict[str, Tensor]:
    """Splats of a few pixels at most, centred within 6 pixels of an edge of ``view``'s image:
    where gsplat's float32 ``h² = c² - temp`` rounds a radius of 1 up to 2 or more."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    depth = torch.exp(torch.empty(n, dtype=d).uniform_(math.log(0.05), math.log(300), generator=g))
    side = torch.randint(0, 4, (n,), generator=g)
    off = (torch.rand(n, generator=g, dtype=d) - 0.5) * 12
    along_x = torch.rand(n, generator=g, dtype=d) * view.width
    along_y = torch.rand(n, generator=g, dtype=d) * view.height
    px = torch.where(side == 0, off, torch.where(side == 1, view.width + off, along_x))
    py = torch.where(side == 2, off, torch.where(side == 3, view.height + off, along_y))
    K = view.K.double()
    cam = torch.stack(
        [(px - K[0, 2]) / K[0, 0] * depth, (py - K[1, 2]) / K[1, 1] * depth, depth], -1
    )
    vm = view.viewmat.double()
    pixel = torch.log(depth / K[0, 0])[:, None]  # log of one pixel's size at that depth
    log_scales = pixel + torch.empty(n, 3, dtype=d).uniform_(-8.0, 1.0, generator=g)
    return {
        "means": ((cam - vm[:3, 3]) @ vm[:3, :3]).float(),
        "scales": log_scales.float(),
        "quats": torch.randn(n, 4, generator=g).float(),
        "opacities": torch.full((n,), 3.0),
    }


def test_surfel_pad_covers_gsplats_float32_rounding():
    """Tiny splats at the edges of the large image: gsplat's float32 keeps some the exact
    computation drops, the bound without its rounding pad would cull some of those, and with it
    culls none."""
    view = VIEWS[3]
    params = edge_splats(view, 30000, seed=7)
    exact, rounded = (required(params, view, dt) for dt in (torch.float64, torch.float32))
    assert (rounded & ~exact).sum() > 50
    vis = culled_bits(Culler(CPU, bound="surfel"), params, [view])[0]
    assert not (rounded & ~vis).any() and not (exact & ~vis).any()
    cams = pack_cameras([view])
    cams[:, 23] = 1.0  # no pad but gsplat's ceil
    bits = cull_bits_torch(params["means"], params["scales"], params["opacities"], cams, "surfel")
    unpadded = unpack_bits(bits, 1)[0]
    assert not (exact & ~unpadded).any()  # the exact computation needs no pad ...
    assert (rounded & ~unpadded).sum() > 10  # ... gsplat's float32 does


def test_surfel_bound_reads_two_scale_columns():
    params = scene(1000)
    cams = pack_cameras(VIEWS)
    three = cull_bits_torch(params["means"], params["scales"], params["opacities"], cams, "surfel")
    two = cull_bits_torch(
        params["means"], params["scales"][:, :2].contiguous(), params["opacities"], cams, "surfel"
    )
    assert torch.equal(three, two)
    culler = Culler(CPU, bound="surfel")
    strided = torch.cat([params["means"], params["scales"], params["opacities"][:, None]], 1)
    got = culler.cull(strided[:, :3], strided[:, 3:5], strided[:, 6], VIEWS)
    want = culler.cull(params["means"], params["scales"], params["opacities"], VIEWS)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.vis, want.vis)
    # The ellipsoid bound reads the third column; the surfel bound is tighter without it.
    ellipsoid = cull_bits_torch(params["means"], params["scales"], params["opacities"], cams)
    assert unpack_bits(three, len(VIEWS)).sum() < unpack_bits(ellipsoid, len(VIEWS)).sum() * 2


def test_surfel_bound_keeps_close_splats_between_the_planes():
    view = VIEWS[0]
    vm = view.viewmat.double()
    cam = torch.tensor(
        [[50.0, 0.0, 1.0], [50.0, 0.0, 1.0], [0.0, 0.0, 0.005], [0.0, 0.0, -1.0], [50.0, 0.0, 1.0]],
        dtype=torch.float64,
    )  # far off to the side at depth 1 (twice), before the near plane, behind
    means = ((cam - vm[:3, 3]) @ vm[:3, :3]).float()
    log_scales = torch.log(
        torch.tensor([[0.6, 0.1], [0.2, 0.1], [1.0, 1.0], [5.0, 5.0], [0.6, 0.1]])
    )
    opacities = torch.tensor([2.0, 2.0, 2.0, 2.0, MIN_OPACITY_LOGIT - 0.01])
    result = Culler(CPU, bound="surfel").cull(means, log_scales, opacities, [view])
    # depth < 2 x scale: kept; depth > 2 x scale and off to the side: culled; outside the
    # planes or transparent: culled.
    assert result.ids.tolist() == [0]


# --- bad input


def test_bounds_refuse_what_they_are_not_proven_for():
    params = scene(100)
    means, scales, opac = params["means"], params["scales"], params["opacities"]
    with pytest.raises(ClmError, match="unknown culling bound 'sphere'"):
        Culler(CPU, bound="sphere")
    with pytest.raises(ClmError, match="ellipsoid culling bound takes log-scales of 1, 2, 3 col"):
        Culler(CPU).cull(means, torch.cat([scales, scales], 1), opac, VIEWS)
    with pytest.raises(ClmError, match="surfel culling bound takes log-scales of 2, 3 columns"):
        Culler(CPU, bound="surfel").cull(means, scales[:, :1], opac, VIEWS)
    with pytest.raises(ClmError, match="surfel culling bound"):
        cull_bits_torch(means, torch.cat([scales, scales], 1), opac, pack_cameras(VIEWS), "surfel")


def test_piece_culler_takes_the_bound_and_the_whole_views_pad():
    culler = PieceCuller(CPU, bound="surfel")
    assert culler.bound == "surfel"
    view = VIEWS[3]
    piece = whole(view).part(16, 32, 80, 96)
    cams = culler.cameras([piece, view])
    alone = pack_cameras([piece])[0]
    assert torch.equal(cams[0, 23], cams[1, 23])  # the whole view's pad ...
    assert cams[0, 23] != alone[23]  # ... not the window's own
    assert torch.equal(cams[0, 18:20], cams[1, 18:20])
    assert torch.equal(cams[0, :18], alone[:18])


# --- ellipsoid: the default, unchanged


def old_cull_bits(
    means: Tensor, log_scales: Tensor, opacity_logits: Tensor, cams: Tensor
) -> Tensor:
    """``cull_bits_torch`` as it was before the surfel bound (a copy)."""
    rot = cams[:, :9].reshape(-1, 3, 3)
    p = torch.einsum("bij,nj->bni", rot, means) + cams[:, None, 9:12]
    x, y, z = p.unbind(-1)
    s2 = torch.exp(log_scales.max(dim=-1).values)[None] ** 2
    col = lambda j: cams[:, j, None]  # noqa: E731
    rz = 1.0 / z
    px, py = col(12) * x * rz + col(14), col(13) * y * rz + col(15)
    fxz, fyz = col(12) * rz, col(13) * rz
    rx = col(22) * torch.sqrt(fxz * fxz * col(18) * s2 + 0.3) + 1.5
    ry = col(22) * torch.sqrt(fyz * fyz * col(19) * s2 + 0.3) + 1.5
    vis = (
        (z >= col(20))
        & (z <= col(21))
        & (px + rx > 0)
        & (px - rx < col(16))
        & (py + ry > 0)
        & (py - ry < col(17))
        & (opacity_logits >= MIN_OPACITY_LOGIT)[None]
    )
    weights = torch.ones(vis.shape[0], dtype=torch.int64)
    weights = torch.bitwise_left_shift(weights, torch.arange(vis.shape[0]))
    return (vis.long() * weights[:, None]).sum(0)


def test_ellipsoid_default_is_unchanged():
    params = scene(3000)
    args = (params["means"], params["scales"], params["opacities"])
    cams = pack_cameras(VIEWS)
    old = old_cull_bits(*args, cams)
    assert 0 < int(unpack_bits(old, len(VIEWS)).sum()) < 0.9 * len(VIEWS) * args[0].shape[0]
    assert torch.equal(cull_bits_torch(*args, cams), old)
    assert torch.equal(cull_bits_torch(*args, cams, "ellipsoid"), old)
    want = unpack_bits(old, len(VIEWS))
    for culler in (Culler(CPU), Culler(CPU, chunk=1 << 10), Culler(CPU, bound="ellipsoid")):
        assert culler.bound == "ellipsoid"
        got = culled_bits(culler, params, VIEWS)
        assert torch.equal(got, want)
    assert PieceCuller(CPU).visible_counts(*args, VIEWS) == want.sum(1).tolist()
