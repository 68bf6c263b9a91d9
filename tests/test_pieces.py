"""Views larger than the row cache, rendered in pieces: stitched renders, the one-pass and
two-pass gradients and an offloaded engine with a tiny cache all match whole-image rendering."""

import math

import pytest
import torch
from test_engines import Observed, assert_same, make_engine, render_every_row, train
from test_methods import SURFELS, surfel_engine

from clm.engine.base import LocalLoss
from clm.engine.offloaded import OffloadEngine
from clm.errors import ClmError
from clm.methods.base import photometric_loss
from clm.methods.gaussians import GaussianSplatting
from clm.model.spec import gaussian_splatting_spec
from clm.offload import pieces as pieces_module
from clm.offload.piece_grads import Canvas, CropGrad, ImageGrad
from clm.offload.pieces import (
    TILE,
    PieceCuller,
    cut_views,
    group_units,
    margin_for,
)
from clm.render.base import View
from clm.render.splats import render_torch
from clm.train.batch_loss import BatchLoss, LocalBatchLoss, batch_loss

W, H = 96, 64
CPU = torch.device("cpu")

SPEC3 = gaussian_splatting_spec(3)


def scene(n: int = 800, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([4.0, 1.5, 4.0]),
        "scales": torch.log(torch.rand(n, 3, generator=g) * 0.04 + 0.01),
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g) * 0.5,
        "shN": torch.randn(n, 15, 3, generator=g) * 0.05,
    }


def ring_views(count: int, focal: float = 60.0) -> list[View]:
    """Cameras on a circle looking outwards, off-centre principal points."""
    views = []
    for i in range(count):
        a = 2 * math.pi * i / count
        fwd = torch.tensor([math.cos(a), 0.0, math.sin(a)])
        right = torch.tensor([-math.sin(a), 0.0, math.cos(a)])
        rot = torch.stack([right, torch.tensor([0.0, 1.0, 0.0]), fwd])
        vm = torch.eye(4)
        vm[:3, :3] = rot
        vm[:3, 3] = -rot @ (-0.3 * fwd)
        K = torch.tensor([[focal, 0, W / 2 + 3], [0, focal, H / 2 - 2], [0, 0, 1]])
        views.append(View(vm, K, W, H))
    return views


def visible(params, views) -> list[int]:
    keys = (params["means"], params["scales"], params["opacities"])
    return PieceCuller(CPU).visible_counts(*keys, views)


def render_pieces(params, view, capacity, bg, sh_degree=3):
    """Pass 1 by hand: each piece renders the whole view from the rows it culls."""
    culler = PieceCuller(CPU)
    cut = cut_views(culler, SPEC3.cull_inputs(params), [view], capacity)[0]
    keys = (params["means"], params["scales"], params["opacities"])
    canvas, rows = Canvas(), []
    for piece, n in cut:
        ids = culler.cull(*keys, [piece]).ids
        assert ids.numel() == n <= capacity
        with torch.no_grad():
            out = render_torch({k: t[ids] for k, t in params.items()}, view, sh_degree, bg)
        canvas.paint(piece, out, ids)
        rows.append(ids)
    return cut, canvas, rows


def test_pieces_tile_the_image_on_tile_boundaries():
    params, view = scene(), ring_views(6)[0]
    cut = cut_views(PieceCuller(CPU), SPEC3.cull_inputs(params), [view], 150)[0]
    covered = torch.zeros(H, W, dtype=torch.int32)
    for piece, _ in cut:
        assert piece.x0 % TILE == 0 and piece.y0 % TILE == 0
        assert piece.width % TILE == 0 or piece.x0 + piece.width == W
        assert piece.height % TILE == 0 or piece.y0 + piece.height == H
        piece.cut(covered).add_(1)
    assert len(cut) > 2 and bool((covered == 1).all())


def test_stitched_pieces_equal_the_whole_render():
    params, bg = scene(), torch.tensor([0.2, 0.1, 0.3])
    for view, rows in zip(ring_views(6), visible(scene(), ring_views(6)), strict=True):
        cut, canvas, _ = render_pieces(params, view, rows // 2, bg)
        assert len(cut) > 2
        got = canvas.output()
        want = render_torch(params, view, 3, bg)
        torch.testing.assert_close(got.image, want.image, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.alpha, want.alpha, rtol=0, atol=1e-6)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.means2d, want.means2d.detach())
        assert torch.equal(got.radii, want.radii)


def test_two_passes_give_the_whole_image_gradients():
    params, bg = scene(seed=3), torch.tensor([0.2, 0.1, 0.3])
    view = ring_views(6)[2]
    target = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(5))

    def loss(out):
        return photometric_loss(out.image, target) / 3

    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    whole = render_torch(leaves, view, 3, bg)
    loss(whole).backward()

    cut, canvas, rows = render_pieces(params, view, visible(params, [view])[0] // 2, bg)
    assert len(cut) > 2
    image_grad = ImageGrad(canvas, loss)
    pieces = {k: t.clone().requires_grad_() for k, t in params.items()}
    for (piece, _), ids in zip(cut, rows, strict=True):
        out = render_torch({k: t[ids] for k, t in pieces.items()}, view, 3, bg)
        image_grad.loss(piece, out).backward()
        image_grad.record(out, ids)
    for name, leaf in leaves.items():
        scale = leaf.grad.abs().max()
        torch.testing.assert_close(pieces[name].grad / scale, leaf.grad / scale, atol=1e-5, rtol=0)
    # density control sees one visit per view and the whole screen-space gradient
    ids, out = image_grad.observed()
    assert torch.equal(ids, whole.ids)
    scale = whole.means2d.grad.abs().max()
    torch.testing.assert_close(
        out.means2d.grad / scale, whole.means2d.grad / scale, atol=1e-5, rtol=0
    )


def surfel_scene(seed: int = 0) -> dict[str, torch.Tensor]:
    params = scene(seed=seed)
    params["scales"] = params["scales"][:, :2].contiguous()
    return params


@pytest.mark.parametrize("method", ["3dgs", "2dgs"])
@pytest.mark.parametrize("margin", ["reach", "tiles", "short"])
def test_one_pass_gives_the_whole_image_gradients(method, margin):
    """Each piece, culled with a margin of the loss's reach, backpropagates its crop's loss
    to its window: the whole image's gradients, screen-space gradients and logged loss. A
    margin short of the reach gets them wrong (the check can fail)."""
    chosen = GaussianSplatting() if method == "3dgs" else SURFELS
    params = scene(seed=3) if method == "3dgs" else surfel_scene(seed=3)
    spec = chosen.spec(3)
    render = chosen.renderer(CPU, training=True)
    bg, view = torch.tensor([0.2, 0.1, 0.3]), ring_views(6)[2]
    target = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(5))
    reach = chosen.loss_reach()
    assert reach == 10
    pixels = {"reach": reach, "tiles": margin_for(reach), "short": 2}[margin]

    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    whole = render(leaves, view, 3, bg)
    want_loss = chosen.loss(whole, target, view, 1)
    want_loss.backward()

    culler = PieceCuller(CPU, bound=spec.cull.shape)
    inputs = spec.cull_inputs(params)
    capacity = visible(params, [view])[0] - 1
    cut = cut_views(culler, inputs, [view], capacity, margin=pixels)[0]
    assert len(cut) > 2
    loss = LocalBatchLoss(chosen, [target], [view], 1, reach)
    grads = CropGrad(0, loss)
    pieces = {k: t.clone().requires_grad_() for k, t in params.items()}
    for piece, n in cut:
        ids = culler.cull(*inputs, [piece]).ids
        assert ids.numel() == n <= capacity
        out = render({k: t[ids] for k, t in pieces.items()}, view, 3, bg)
        grads.backward(piece, out, ids)
    errors = {
        name: float((pieces[name].grad - leaf.grad).abs().max() / leaf.grad.abs().max())
        for name, leaf in leaves.items()
    }
    if margin == "short":
        assert max(errors.values()) > 1e-2
        return
    assert max(errors.values()) < 1e-5, errors
    ids, out = grads.observed()
    assert torch.equal(ids, whole.ids)
    scale = whole.means2d.grad.abs().max()
    torch.testing.assert_close(
        out.means2d.grad / scale, whole.means2d.grad / scale, atol=1e-5, rtol=0
    )
    # the log sees the stitched view's loss, evaluated once
    torch.testing.assert_close(loss.loss_sum, want_loss.detach(), rtol=1e-5, atol=0)


def test_only_a_loss_that_says_its_reach_is_local():
    views, targets = ring_views(2), [torch.zeros(H, W, 3)] * 2
    assert isinstance(batch_loss(GaussianSplatting(), targets, views, 1), LocalLoss)
    assert not isinstance(BatchLoss(GaussianSplatting(), targets, views, 1), LocalLoss)

    class OwnLoss(GaussianSplatting):
        def loss(self, out, target, view, images):
            return out.image.mean()

    assert OwnLoss().loss_reach() is None
    assert not isinstance(batch_loss(OwnLoss(), targets, views, 1), LocalLoss)
    assert GaussianSplatting(ssim_weight=0.0).loss_reach() == 0


def test_a_tile_larger_than_the_cache_is_refused():
    params, view = scene(), ring_views(6)[0]
    with pytest.raises(ClmError, match="16x16-pixel tile"):
        cut_views(PieceCuller(CPU), SPEC3.cull_inputs(params), [view], 10)


def test_groups_are_bounded(monkeypatch):
    assert [len(g) for g in group_units([1] * 100)] == [64, 36]  # cameras culled at once
    monkeypatch.setattr(pieces_module, "PLAN_ELEMENTS", 1000)
    counts = [100, 200, 50, 300, 10, 10]
    groups = group_units(counts)
    assert [k for g in groups for k in g] == list(range(len(counts)))
    for g in groups:
        assert len(g) == 1 or len(g) * sum(counts[k] for k in g) <= 1000
    assert [len(g) for g in groups] == [2, 2, 2]


@pytest.fixture(scope="module")
def setup():
    views = ring_views(6)
    g = torch.Generator().manual_seed(1)
    targets = [torch.rand(H, W, 3, generator=g) for _ in views]
    batches = [[0, 1, 2], [3, 4, 5], [1, 2, 3], [5, 0, 4]]
    degrees = [0, 1, 2, 3]
    return views, targets, batches, degrees


def count_one_pass(monkeypatch) -> list[int]:
    """Views the engine trained in one pass (each one's batch position), call by call."""
    made: list[int] = []

    class Counted(CropGrad):
        def __init__(self, i, loss):
            super().__init__(i, loss)
            made.append(i)

    monkeypatch.setattr("clm.engine.offloaded_pieces.CropGrad", Counted)
    return made


def local_3dgs(targets, views, step):
    return batch_loss(GaussianSplatting(), targets, views, step)


def count_cuts(monkeypatch) -> list[int]:
    """Pieces per view the engine cut, call by call."""
    made: list[int] = []
    real = cut_views

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        made.extend(len(c) for c in out)
        return out

    monkeypatch.setattr("clm.engine.offloaded_pieces.cut_views", spy)
    return made


@pytest.mark.parametrize(
    ("one_pass", "cache_rows", "plan_elements", "resident", "reach"),
    [
        # Every culled-in row rendered (a renderer that declares no reach):
        (False, 245, None, 0, False),  # some views whole, some in pieces, one group a step
        (False, 150, None, 0, False),  # every view in pieces
        (False, 150, 4000, 0, False),  # pieces in several groups a step: shared rows deferred
        (False, 150, None, 200, False),  # pieces that render resident rows too
        # The same in one pass; at these image sizes a margin is a large part of a piece,
        # which then needs a larger cache.
        (True, 245, None, 0, False),
        (True, 200, 4000, 0, False),
        (True, 200, None, 200, False),
        # The rows each piece reads alone: views that read more rows than the cache holds.
        (False, 150, None, 0, True),
        (False, 150, 4000, 0, True),
        (True, 200, 4000, 0, True),
        (True, 200, None, 200, True),
    ],
)
def test_engine_with_a_tiny_cache_matches_the_resident_engine(
    setup, monkeypatch, one_pass, cache_rows, plan_elements, resident, reach
):
    views, targets, batches, degrees = setup
    params = scene()
    if plan_elements is not None:
        monkeypatch.setattr(pieces_module, "PLAN_ELEMENTS", plan_elements)
    made, single = count_cuts(monkeypatch), count_one_pass(monkeypatch)
    steps = len(batches)
    want, seen = Observed(), Observed()
    ref = make_engine("none", params, 3, steps)
    ref = train(ref, views, targets, batches, degrees, densify_at=2, observe=want)
    extra = {"resident": resident, "views": views} if resident else {}
    if not reach:
        extra["render_fn"] = render_every_row
    engine = make_engine("clm", params, 3, steps, cache_rows=cache_rows, staging_rows=64, **extra)
    loss_of = local_3dgs if one_pass else None
    got = train(
        engine, views, targets, batches, degrees, densify_at=2, observe=seen, loss_of=loss_of
    )
    engine.close()
    assert made and min(made) > 1
    assert bool(single) == one_pass
    assert engine.resident.count == resident
    assert_same(got, ref)
    seen.assert_same(want)


def test_one_pass_falls_back_to_two_when_a_tile_and_its_margin_overflow(setup, monkeypatch):
    """A cache that holds the busiest tile but not with its margin: two passes, still exact."""
    views, targets, batches, degrees = setup
    params = scene()
    culler, inputs = PieceCuller(CPU), SPEC3.cull_inputs(params)
    capacity = 150
    with pytest.raises(ClmError):
        cut_views(culler, inputs, views, capacity, margin=margin_for(10))
    cut_views(culler, inputs, views, capacity)  # without the margin it fits
    single = count_one_pass(monkeypatch)
    ref = train(make_engine("none", params, 3, 2), views, targets, batches[:2], degrees[:2])
    engine = make_engine("clm", params, 3, 2, cache_rows=capacity)
    got = train(engine, views, targets, batches[:2], degrees[:2], loss_of=local_3dgs)
    engine.close()
    assert single == []
    assert_same(got, ref)


def test_2dgs_in_one_pass_matches_the_resident_engine(setup, monkeypatch):
    """2DGS's whole loss (normals from depth, distortion) trains views in pieces in one pass."""
    views, targets, batches, degrees = setup
    params = surfel_scene()
    made, single = count_cuts(monkeypatch), count_one_pass(monkeypatch)
    want, seen = Observed(), Observed()

    def whole(targets, views, step):
        return BatchLoss(SURFELS, targets, views, step)

    def local(targets, views, step):
        return batch_loss(SURFELS, targets, views, step)

    batches, degrees = batches[:3], degrees[:3]
    ref = surfel_engine("none", params, 3)
    ref = train(ref, views, targets, batches, degrees, densify_at=2, observe=want, loss_of=whole)
    engine = surfel_engine("clm", params, 3, cache_rows=245, staging_rows=64)
    got = train(engine, views, targets, batches, degrees, densify_at=2, observe=seen, loss_of=local)
    engine.close()
    assert made and min(made) > 1 and single
    assert_same(got, ref)
    seen.assert_same(want)


def test_density_statistics_match_whole_views(setup):
    views, targets, batches, degrees = setup
    params = scene()
    n = params["means"].shape[0]

    def run(engine):
        grad2d, visits = torch.zeros(n), torch.zeros(n)

        def observe(ids, out, view):
            g = out.means2d.grad
            grad2d.index_add_(0, ids, torch.hypot(g[:, 0] * view.width, g[:, 1] * view.height))
            visits.index_add_(0, ids, torch.ones(ids.numel()))

        for batch, degree in zip(batches, degrees, strict=True):

            def loss_fn(i, out, batch=batch):
                return photometric_loss(out.image, targets[batch[i]]) / len(batch)

            engine.train_step([views[i] for i in batch], loss_fn, observe, degree, torch.zeros(3))
        return grad2d, visits

    ref = run(make_engine("none", params, 3, 4))
    engine = make_engine("clm", params, 3, 4, cache_rows=150)
    got = run(engine)
    engine.close()
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-7)


def test_evaluation_renders_large_views_in_pieces(setup, monkeypatch):
    views = setup[0]
    params = scene()
    made = count_cuts(monkeypatch)
    ref = make_engine("none", params, 1, 1)
    engine = make_engine("clm", params, 1, 1, cache_rows=150)
    assert isinstance(engine, OffloadEngine)
    bg = torch.tensor([0.3, 0.2, 0.1])
    for view in views:
        got, want = engine.render(view, 3, bg), ref.render(view, 3, bg)
        torch.testing.assert_close(got.image, want.image, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.alpha, want.alpha, rtol=0, atol=1e-6)
        assert torch.equal(got.ids, want.ids)
    engine.close()
    assert len(made) == len(views) and min(made) > 1


@pytest.mark.parametrize("one_pass", [False, True])
def test_pieces_that_see_nothing(setup, monkeypatch, one_pass):
    """Gaussians on the left of view 0 only: its right-hand pieces are background (in one
    pass they are painted, never backpropagated)."""
    views, targets = setup[0], setup[1]
    params = scene()
    vm, K = views[0].viewmat, views[0].K
    cam = params["means"] @ vm[:3, :3].T + vm[:3, 3]
    keep = (cam[:, 2] > 1.0) & (cam[:, 0] / cam[:, 2] * K[0, 0] + K[0, 2] < W / 8)
    params = {k: t[keep] for k, t in params.items()}
    rows = visible(params, views[:1])[0]
    cut = cut_views(PieceCuller(CPU), SPEC3.cull_inputs(params), views[:1], rows - 1)[0]
    assert min(n for _, n in cut) == 0
    if one_pass:
        margin = margin_for(10)
        cut = cut_views(PieceCuller(CPU), SPEC3.cull_inputs(params), views[:1], rows - 1, margin)
        assert min(n for _, n in cut[0]) == 0
    single = count_one_pass(monkeypatch)
    batches, degrees = [[0, 3], [0, 3]], [1, 1]
    ref = train(make_engine("none", params, 2, 2), views, targets, batches, degrees)
    # (every culled-in row rendered: view 0 reads fewer rows than the cache holds)
    engine = make_engine("clm", params, 2, 2, cache_rows=rows - 1, render_fn=render_every_row)
    got = train(engine, views, targets, batches, degrees, loss_of=local_3dgs if one_pass else None)
    assert bool(single) == one_pass
    bg = torch.tensor([0.3, 0.2, 0.1])
    image = engine.render(views[0], 1, bg).image
    engine.close()
    assert_same(got, ref)
    torch.testing.assert_close(image[:, -TILE:], bg.expand(H, TILE, 3))
