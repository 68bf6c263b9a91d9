"""GPU tests of views rendered in pieces (``pytest -m gpu``): with gsplat, stitched pieces give
the whole image and its gradients, and the offloaded engine with a tiny cache trains as the
GPU-resident engine does."""

import pytest
import torch
from test_gpu import _train, assert_same_training, ring_views

from clm.engine.offloaded import OffloadEngine
from clm.engine.resident import ResidentEngine
from clm.methods.base import photometric_loss
from clm.methods.gaussians import GaussianSplatting
from clm.model.spec import gaussian_splatting_spec
from clm.offload import pieces as pieces_module
from clm.offload.piece_grads import Canvas, CropGrad, ImageGrad
from clm.offload.pieces import PieceCuller, cut_views, margin_for
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates, adam_betas
from clm.render.splats import render_gsplat
from clm.train.batch_loss import batch_loss

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
W, H = 200, 136  # not a multiple of the tile size: the last pieces are narrower

SPEC3 = gaussian_splatting_spec(3)


def scene(n: int, seed: int, device="cpu") -> dict[str, torch.Tensor]:
    """Gaussians small on screen, so that a few tiles see a fraction of a view, and 1% large
    ones near the cameras, which cross pieces (and need the whole view's Jacobian clamp)."""
    g = torch.Generator().manual_seed(seed)
    large = n // 100
    spread = torch.tensor([8.0, 2.0, 8.0]).repeat(n, 1)
    spread[:large] = torch.tensor([3.0, 1.0, 3.0])
    size = torch.full((n, 1), 0.02)
    size[:large] = 0.15
    params = {
        "means": (torch.rand(n, 3, generator=g) - 0.5) * spread,
        "scales": torch.log(torch.rand(n, 3, generator=g) * size + size / 2),
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g) * 1.5,
        "sh0": torch.randn(n, 1, 3, generator=g) * 0.5,
        "shN": torch.randn(n, 15, 3, generator=g) * 0.1,
    }
    return {k: v.to(device) for k, v in params.items()}


def rows_seen(params, views) -> list[int]:
    keys = (params["means"], params["scales"], params["opacities"])
    return PieceCuller(CUDA).visible_counts(*keys, views)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_gsplat_pieces_give_the_whole_image_and_its_gradients():
    params = scene(30_000, seed=0, device=CUDA)
    view = ring_views(5, W, H, radius=1.0, device=CUDA)[1]
    bg = torch.tensor([0.2, 0.1, 0.3], device=CUDA)
    target = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(4)).to(CUDA)

    def loss(out):
        return photometric_loss(out.image, target) / 2

    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    whole = render_gsplat(leaves, view, 3, bg)
    loss(whole).backward()

    culler = PieceCuller(CUDA)
    keys = (params["means"], params["scales"], params["opacities"])
    capacity = rows_seen(params, [view])[0] // 3
    cut = [
        (p, culler.cull(*keys, [p]).ids)
        for p, _ in cut_views(culler, SPEC3.cull_inputs(params), [view], capacity)[0]
    ]
    assert len(cut) > 4
    canvas = Canvas()
    for piece, ids in cut:
        assert ids.numel() <= capacity
        with torch.no_grad():
            canvas.paint(
                piece, render_gsplat({k: t[ids] for k, t in params.items()}, view, 3, bg), ids
            )
    got = canvas.output()
    torch.testing.assert_close(got.image, whole.image.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.alpha, whole.alpha.detach(), rtol=0, atol=1e-5)
    order = torch.argsort(whole.ids)
    assert torch.equal(got.ids, whole.ids[order])
    assert torch.equal(got.radii, whole.radii[order])

    image_grad = ImageGrad(canvas, loss)
    split = {k: t.clone().requires_grad_() for k, t in params.items()}
    for piece, ids in cut:
        out = render_gsplat({k: t[ids] for k, t in split.items()}, view, 3, bg)
        image_grad.loss(piece, out).backward()
        image_grad.record(out, ids)
    for name, leaf in leaves.items():  # gsplat's backward sums with atomics: order-level noise
        assert relative_error(split[name].grad, leaf.grad) < 1e-4, name
    _, observed = image_grad.observed()
    assert relative_error(observed.means2d.grad, whole.means2d.grad[order]) < 1e-4


def test_gsplat_pieces_in_one_pass_give_the_whole_image_gradients():
    """Each piece culled with its loss's margin and backpropagating its crop's loss: gsplat's
    whole-image gradients."""
    params = scene(30_000, seed=0, device=CUDA)
    view = ring_views(5, W, H, radius=1.0, device=CUDA)[1]
    bg = torch.tensor([0.2, 0.1, 0.3], device=CUDA)
    target = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(4)).to(CUDA)
    method = GaussianSplatting()

    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    whole = render_gsplat(leaves, view, 3, bg)
    method.loss(whole, target, view, 1).backward()

    culler = PieceCuller(CUDA)
    keys = (params["means"], params["scales"], params["opacities"])
    capacity = rows_seen(params, [view])[0] // 2
    margin = margin_for(method.loss_reach())
    cut = cut_views(culler, SPEC3.cull_inputs(params), [view], capacity, margin)[0]
    assert len(cut) > 4
    loss = batch_loss(method, [target], [view], 1)
    grads = CropGrad(0, loss)
    split = {k: t.clone().requires_grad_() for k, t in params.items()}
    for piece, _ in cut:
        ids = culler.cull(*keys, [piece]).ids
        assert ids.numel() <= capacity
        grads.backward(
            piece, render_gsplat({k: t[ids] for k, t in split.items()}, view, 3, bg), ids
        )
    for name, leaf in leaves.items():  # gsplat's backward sums with atomics: order-level noise
        assert relative_error(split[name].grad, leaf.grad) < 1e-4, name
    ids, observed = grads.observed()
    order = torch.argsort(whole.ids)
    assert torch.equal(ids, whole.ids[order])
    assert relative_error(observed.means2d.grad, whole.means2d.grad[order]) < 1e-4


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("plan_elements", [None, 60_000])  # one group a step, or several
def test_offload_engine_with_a_tiny_cache_matches_the_resident_engine(
    monkeypatch, plan_elements, one_pass
):
    if plan_elements is not None:
        monkeypatch.setattr(pieces_module, "PLAN_ELEMENTS", plan_elements)
    spec = gaussian_splatting_spec(3)
    params = scene(20_000, seed=5)
    views = ring_views(8, W, H, radius=1.0, device=CUDA)
    g = torch.Generator().manual_seed(2)
    targets = [torch.rand(H, W, 3, generator=g).to(CUDA) for _ in views]
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [1, 3, 5, 7], [0, 2, 4, 6]]
    degrees = [0, 1, 2, 3]
    cache_rows = min(rows_seen({k: t.to(CUDA) for k, t in params.items()}, views)) // 3

    def common():
        return {
            "spec": spec,
            "render_fn": render_gsplat,
            "lrs": LearningRates(spec, 10, extent=3.0, batch_size=4),
            "adam": AdamConfig(betas=adam_betas(4)),
            "device": CUDA,
        }

    resident = ResidentEngine(params, **common())
    engine = OffloadEngine(params, cache_rows=cache_rows, staging_rows=4096, **common())
    bg = torch.zeros(3, device=CUDA)
    for view in views[:3]:  # evaluation goes piece by piece too
        a, b = engine.render(view, 3, bg), resident.render(view, 3, bg)
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-5)
    ref = _train(resident, views, targets, batches, degrees)
    if one_pass:
        made = []

        class Counted(CropGrad):
            def __init__(self, i, loss):
                super().__init__(i, loss)
                made.append(i)

        monkeypatch.setattr("clm.engine.offloaded_pieces.CropGrad", Counted)
        got = _train(engine, views, targets, batches, degrees, GaussianSplatting())
        assert made
    else:
        got = _train(engine, views, targets, batches, degrees)
    engine.close()
    assert_same_training(got, ref)
