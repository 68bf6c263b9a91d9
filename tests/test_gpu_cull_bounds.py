"""GPU tests of the culling bounds (``pytest -m gpu`` on a CUDA machine): the kernel against its
torch twin for both bounds, and the ``surfel`` bound against gsplat's real 2DGS projection and
render. The CPU side (tests/test_cull_bounds.py) checks the bound against a reference written
from gsplat's source; here gsplat itself is the reference, and that reference is checked too."""

import pytest
import torch
from test_cull_bounds import (
    VIEWS,
    culled_bits,
    edge_splats,
    gsplat_2dgs_conic,
    gsplat_2dgs_keeps,
    scene,
)

from clm.offload.culling import Culler, cull_bits_torch
from clm.offload.pieces import PieceCuller, whole
from clm.render.base import View
from clm.render.projection import ALPHA_THRESHOLD

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def hard_scene() -> dict[str, torch.Tensor]:
    """tests/test_cull_bounds.py's splats (near, behind, off-screen, anisotropic, larger than
    their depth) and tiny ones at the image edges, where gsplat's float32 rounding shows."""
    parts = [scene(20_000)] + [edge_splats(v, 10_000, seed=20 + k) for k, v in enumerate(VIEWS)]
    return {key: torch.cat([p[key] for p in parts]).to(CUDA) for key in parts[0]}


def cuda_views() -> list[View]:
    return [v.to(CUDA) for v in VIEWS]


def projection_2dgs(params, view: View, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """gsplat's own 2DGS projection of ``params`` for ``view``: ``(kept [N] bool, boxes)`` with
    ``boxes = (means2d [N, 2], radii [N, 2])`` (rows it drops: zero radii, any centre)."""
    from gsplat import fully_fused_projection_2dgs

    n = params["means"].shape[0]
    out = fully_fused_projection_2dgs(
        params["means"],
        params["quats"],
        torch.exp(params["scales"][:, :3]),  # gsplat takes 3 columns and ignores the third
        view.viewmat[None],
        view.K[None],
        view.width,
        view.height,
        packed=packed,
    )
    means2d = torch.zeros(n, 2, device=CUDA)
    radii = torch.zeros(n, 2, dtype=torch.int32, device=CUDA)
    if packed:
        _, _, gaussian_ids, r, m, *_ = out
        means2d[gaussian_ids.long()] = m
        radii[gaussian_ids.long()] = r
    else:
        r, m, *_ = out
        means2d, radii = m[0], r[0]
    return (radii > 0).any(-1), (means2d, radii)


def opaque(params) -> torch.Tensor:
    """Splats gsplat's rasterizer does not skip at every pixel for their opacity."""
    return torch.sigmoid(params["opacities"].double()) >= ALPHA_THRESHOLD


@pytest.mark.parametrize("bound", ["ellipsoid", "surfel"])
def test_cull_kernel_matches_torch_twin(bound):
    params = hard_scene()
    views = cuda_views()
    culler = Culler(CUDA, chunk=1 << 15, bound=bound)  # several chunks
    assert culler.use_kernel and culler.bound == bound
    args = (params["means"], params["scales"], params["opacities"])
    result = culler.cull(*args, views)
    twin = cull_bits_torch(*args, culler.cameras(views), bound)
    # This scene puts tens of thousands of splats on the image edges on purpose, where the
    # kernel's fused multiply-adds (and __expf for ellipsoids) may flip a bit the torch twin
    # rounds the other way; such flips stay below one row in ten thousand.
    kernel = torch.zeros_like(twin)
    shifts = torch.arange(len(views), device=CUDA)[:, None]
    kernel[result.ids] = (result.vis.long() << shifts).sum(0)
    flipped = int((kernel != twin).sum())
    assert flipped <= 1e-4 * twin.numel(), flipped
    # Column views of packed key rows (a surfel row with two log-scales, or three).
    cols = 2 if bound == "surfel" else 3
    packed = torch.cat([params["means"], params["opacities"][:, None], params["scales"]], dim=1)
    scales = packed[:, 4 : 4 + cols]
    strided = culler.cull(packed[:, :3], scales, packed[:, 3], views)
    assert torch.equal(strided.ids, result.ids) and torch.equal(
        strided.vis, result.vis
    )  # same kernel
    twin2 = cull_bits_torch(packed[:, :3], scales, packed[:, 3], culler.cameras(views), bound)
    assert torch.equal(twin2, twin)


@pytest.mark.parametrize("packed", [False, True], ids=["fused", "packed"])
def test_surfel_bound_keeps_every_splat_gsplat_2dgs_projects(packed):
    params = hard_scene()
    views = cuda_views()
    vis = culled_bits(Culler(CUDA, bound="surfel"), params, views)
    for c, view in enumerate(views):
        kept, _ = projection_2dgs(params, view, packed)
        need = kept & opaque(params)
        missed = need & ~vis[c]
        assert not missed.any(), f"camera {c}: {int(missed.sum())} splats gsplat projects culled"
        assert need.sum() > 1000
        assert vis[c].sum() < 2 * need.sum()  # and the bound still culls
        print(
            f"camera {c}: gsplat keeps {int(need.sum())}, the bound {int(vis[c].sum())} "
            f"of {need.numel()}"
        )


def test_reference_of_the_cpu_test_is_gsplats_projection():
    """tests/test_cull_bounds.py's reference gives gsplat's centres, and its radii up to float32
    rounding of ``h²``, so its zero-miss checks are checks against gsplat."""
    params = hard_scene()
    cpu = {k: v.cpu() for k, v in params.items()}
    extent = float(torch.tensor(3.33, dtype=torch.float32))
    for view in cuda_views():
        kept, (means2d, radii) = projection_2dgs(params, view, packed=False)
        kept, means2d, radii = kept.cpu(), means2d.cpu().double(), radii.cpu().double()
        view_cpu = View(view.viewmat.cpu(), view.K.cpu(), view.width, view.height)
        args = (cpu["means"], cpu["quats"], torch.exp(cpu["scales"]), view_cpu, torch.float64)
        depth, _, ref_means2d, half_extend = gsplat_2dgs_conic(*args)
        # Away from the camera plane and the near plane, where float32 on either side rounds
        # the inputs' transform alike.
        steady = (depth > 2 * torch.exp(cpu["scales"][:, :2].double().amax(-1))) & (depth > 0.1)
        # (Tiny splats at the edges may flip with the rounding: a few per thousand.)
        assert ((kept ^ gsplat_2dgs_keeps(*args)) & steady).float().mean() < 5e-3
        rows = kept & steady
        assert rows.sum() > 1000
        size = ref_means2d.abs() + half_extend.abs().sqrt() + view.width + view.height
        assert ((means2d - ref_means2d).abs() / size)[rows].max() < 1e-4
        # gsplat's radius is ceil(3.33 sqrt(h²)) for some h² within float32 rounding of ours.
        delta = 1e-5 * (ref_means2d**2 + half_extend.abs())
        lo = torch.ceil(extent * torch.sqrt((half_extend - delta).clamp_min(1e-4)))
        hi = torch.ceil(extent * torch.sqrt((half_extend + delta).clamp_min(1e-4)))
        bracketed = ((radii >= lo) & (radii <= hi)).all(-1)
        assert bracketed[rows].float().mean() > 0.999


def test_piece_culler_keeps_what_gsplat_2dgs_draws_in_a_window():
    """A whole-view 2DGS render draws a splat in a tile-aligned window when its box meets the
    window; PieceCuller with the surfel bound keeps all of those."""
    params = hard_scene()
    culler = PieceCuller(CUDA, bound="surfel")
    for view in (VIEWS[0].to(CUDA), VIEWS[3].to(CUDA)):
        kept, (means2d, radii) = projection_2dgs(params, view, packed=False)
        lo, hi = means2d - radii, means2d + radii
        piece = whole(view)
        windows = [
            piece.part(128, 96, 288, 224),
            piece.part(0, 0, 64, 48),
            piece.part(view.width - 48, 16, view.width, view.height),
        ]
        vis = culled_bits(culler, params, windows)
        for k, w in enumerate(windows):
            meets = (hi[:, 0] > w.x0) & (lo[:, 0] < w.x0 + w.width)
            meets &= (hi[:, 1] > w.y0) & (lo[:, 1] < w.y0 + w.height)
            need = kept & meets & opaque(params)
            assert need.any()
            assert not (need & ~vis[k]).any(), f"window {k} culls splats gsplat draws there"


def render_2dgs(params, colors, rows, view: View) -> tuple[torch.Tensor, torch.Tensor]:
    """gsplat's 2DGS image and alpha of ``rows`` of ``params`` for ``view``."""
    from gsplat import rasterization_2dgs

    out = rasterization_2dgs(
        params["means"][rows],
        params["quats"][rows],
        torch.exp(params["scales"][rows, :3]),
        torch.sigmoid(params["opacities"][rows]),
        colors[rows][:, None, :],  # as degree-0 SH, the form test_gpu_surfels.py runs
        view.viewmat[None],
        view.K[None],
        view.width,
        view.height,
        sh_degree=0,
    )
    return out[0], out[1]


def test_rendering_only_the_kept_splats_gives_the_same_image():
    params = {k: v[::4].contiguous() for k, v in hard_scene().items()}
    n = params["means"].shape[0]
    colors = torch.rand(n, 3, generator=torch.Generator().manual_seed(0)).to(CUDA)
    culler = Culler(CUDA, bound="surfel")
    every = torch.arange(n, device=CUDA)
    for view in cuda_views():
        ids = culler.cull(params["means"], params["scales"], params["opacities"], [view]).ids
        assert 0 < ids.numel() < n
        image_all, alpha_all = render_2dgs(params, colors, every, view)
        image_kept, alpha_kept = render_2dgs(params, colors, ids, view)
        assert alpha_all.max() > 0.1
        torch.testing.assert_close(image_kept, image_all, atol=1e-5, rtol=0)
        torch.testing.assert_close(alpha_kept, alpha_all, atol=1e-5, rtol=0)
