"""The --max-gpu-gb planner: what fits, how the row cache is sized, and clear refusals."""

import pytest
import torch
from test_engines import make_params, ring_views

from clm.errors import ClmError
from clm.model.spec import gaussian_splatting_spec
from clm.offload.budget import (
    GIB,
    MIN_VIEW_SHARE,
    VIEW_SHARE_MARGIN,
    busiest_view_share,
    plan_gpu,
)
from clm.offload.culling import Culler

SPEC = gaussian_splatting_spec(3)
PIXELS = 1920 * 1080


def fits(plan) -> bool:
    return plan.max_gaussians * plan.per_gaussian + plan.workspace <= plan.budget


@pytest.mark.parametrize("offload", ["none", "naive", "clm"])
def test_every_plan_fits_its_budget(offload):
    plan = plan_gpu(SPEC, offload, 24 * GIB, PIXELS)
    assert fits(plan) and plan.max_gaussians > 0
    assert (plan.cache_rows > 0) == (offload == "clm")


def test_offloading_holds_far_more_gaussians_than_the_gpu_alone():
    none = plan_gpu(SPEC, "none", 24 * GIB, PIXELS)
    clm = plan_gpu(SPEC, "clm", 24 * GIB, PIXELS, view_share=0.05)
    assert none.per_gaussian > 10 * clm.per_gaussian
    assert clm.max_gaussians > 5 * none.max_gaussians


@pytest.mark.parametrize("share", [0.0, 0.003, 0.05, 0.25, 0.9])
def test_the_cache_holds_the_busiest_view_of_the_largest_scene(share):
    plan = plan_gpu(SPEC, "clm", 24 * GIB, PIXELS, view_share=share)
    assert fits(plan)
    wanted = min(1.0, max(share * VIEW_SHARE_MARGIN, MIN_VIEW_SHARE))
    assert plan.cache_rows >= wanted * plan.max_gaussians
    # and nothing is left over that could have held more Gaussians
    per_more = plan.per_gaussian + wanted * (plan.workspace / max(plan.cache_rows, 1))
    assert plan.budget - plan.max_gaussians * plan.per_gaussian - plan.workspace < 2 * per_more


def test_views_that_see_less_allow_more_gaussians():
    counts = [plan_gpu(SPEC, "clm", 24 * GIB, PIXELS, s).max_gaussians for s in (0.5, 0.2, 0.05)]
    assert counts[0] < counts[1] < counts[2]


def test_a_budget_too_small_for_the_images_is_refused():
    with pytest.raises(ClmError, match="too small to render"):
        plan_gpu(SPEC, "clm", GIB // 2, PIXELS)


def test_busiest_view_share_is_the_largest_culled_fraction():
    params = make_params(3000, seed=6)
    views = ring_views(5)
    culled = Culler(torch.device("cpu")).cull(
        params["means"], params["scales"], params["opacities"], views
    )
    per_view = culled.vis.sum(dim=1)
    assert busiest_view_share(params, views) == int(per_view.max()) / 3000
    assert 0 < busiest_view_share(params, views[:1]) <= busiest_view_share(params, views)
