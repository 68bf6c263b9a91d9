"""The rows a render reads (clm.render.reach), against the renderer itself: a render from the
read rows alone gives the whole render's image, alpha and gradients, with the rows in the
order they were walked in or in another (with depth ties), and no row outside them has any
gradient."""

from __future__ import annotations

import pytest
import torch
from test_rasterizer import camera, random_scene
from torch import Tensor

from clm.render import native_raster
from clm.render.base import reach_of
from clm.render.reach import REACH_TORCH, reached_torch
from clm.render.splats import default_renderer, render_torch


@pytest.fixture(params=["native", "pairs"])
def walk(request, monkeypatch):
    """The CPU walk in C (with the native rasterizer), or over the torch rasterizer's pairs
    (with the torch rasterizer)."""
    if request.param == "native" and not native_raster.usable():
        pytest.skip("no C compiler for the native rasterizer")
    if request.param == "pairs":
        monkeypatch.setattr(native_raster, "usable", lambda *tensors: False)
    return request.param


def occluding_scene(n: int, seed: int) -> dict[str, Tensor]:
    """Random Gaussians, most of them opaque, so that many hide behind others; the second half
    repeats the centres of the first (depth ties, which the render breaks by row order)."""
    params = random_scene(n, seed)
    params["opacities"] = params["opacities"].abs() + 1.0
    params["means"][n // 2 :] = params["means"][: n // 2]
    return params


def render_and_grads(params: dict[str, Tensor], view, weights: tuple[Tensor, Tensor]):
    """Image, alpha, rows drawn and each parameter's gradient of a fixed weighting of both."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = render_torch(leaves, view, 3, torch.tensor([0.2, 0.3, 0.4]))
    ((out.image * weights[0]).sum() + (out.alpha * weights[1]).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    return out.image.detach(), out.alpha.detach(), out.ids, grads


def weights(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(48, 64, 3, generator=g) - 0.3, torch.rand(48, 64, 1, generator=g) - 0.5


def assert_render_of(rows: Tensor, params: dict[str, Tensor], view, seed: int) -> None:
    """A render from ``rows`` alone is the render of all of ``params``."""
    w = weights(seed)
    image, alpha, _, grads = render_and_grads(params, view, w)
    part = render_and_grads({k: v[rows] for k, v in params.items()}, view, w)
    assert torch.equal(part[0], image) and torch.equal(part[1], alpha)
    outside = torch.ones(len(params["means"]), dtype=torch.bool)
    outside[rows] = False
    for name, grad in grads.items():  # (the torch rasterizer sums its pairs in another order)
        scale = float(grad.abs().max())
        torch.testing.assert_close(part[3][name], grad[rows], rtol=1e-5, atol=1e-7 * scale)
        assert not grad[outside].any(), name


@pytest.mark.parametrize("seed", [0, 1])
def test_a_render_of_the_read_rows_is_the_whole_render(seed: int, walk: str) -> None:
    params, view = occluding_scene(3000, seed), camera(64, 48)
    reach = reached_torch(params, view)
    drawn = render_and_grads(params, view, weights(0))[2]
    assert torch.equal(torch.nonzero(reach.drawn).squeeze(1), drawn)
    assert not (reach.read & ~reach.drawn).any()
    # Most of the scene is hidden: the render draws many rows it does not read.
    assert 0.1 * drawn.numel() < int(reach.read.sum()) < 0.6 * drawn.numel()
    assert_render_of(torch.nonzero(reach.read).squeeze(1), params, view, seed)


def test_reach_holds_for_rows_in_another_order(walk: str) -> None:
    """The render's stable depth sort orders ties by row: rows walked in one order and
    rendered in another (as the offload engine does) still read nothing outside the reach."""
    params, view = occluding_scene(3000, 2), camera(64, 48)
    read = reached_torch(params, view).read
    order = torch.randperm(3000, generator=torch.Generator().manual_seed(3))
    shuffled = {k: v[order] for k, v in params.items()}
    assert_render_of(torch.nonzero(read[order]).squeeze(1), shuffled, view, 4)


def test_native_and_torch_walks_agree(monkeypatch) -> None:
    if not native_raster.usable():
        pytest.skip("no C compiler for the native rasterizer")
    params, view = occluding_scene(3000, 4), camera(64, 48)
    native = reached_torch(params, view).read
    monkeypatch.setattr(native_raster, "usable", lambda *tensors: False)
    pairs = reached_torch(params, view).read
    assert int((native ^ pairs).sum()) <= 0.01 * int(pairs.sum())  # rounding at the cut-offs


def test_renderers_declare_their_reach() -> None:
    cpu = torch.device("cpu")
    assert reach_of(default_renderer(cpu)) is REACH_TORCH
    assert reach_of(default_renderer(cpu, depth=True, extra=("f",))) is REACH_TORCH
    assert reach_of(lambda params, view, degree, background: None) is None
