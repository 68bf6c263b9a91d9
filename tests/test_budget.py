"""The --max-gpu-gb planner: what fits, how the row cache is sized, and clear refusals."""

import math

import pytest
import torch
from test_engines import make_params, ring_views

from clm.errors import ClmError
from clm.model.spec import gaussian_splatting_spec
from clm.offload.budget import (
    GIB,
    MAX_CACHE_SHARE,
    MIN_PIECE_PIXELS,
    MIN_VIEW_SHARE,
    RENDER_BYTES_PER_PIXEL,
    TRANSIENT_BYTES,
    VIEW_SHARE_MARGIN,
    busiest_view_share,
    plan_gpu,
)
from clm.offload.culling import Culler
from clm.offload.host_budget import HostPlan
from clm.offload.pieces import PIECE_FILL
from clm.render.splats import render_torch
from clm.train.engine_factory import EngineOptions, _Plans, _walk_on_gpu

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


def left_after_pixels(budget: int, pixels: int) -> int:
    return budget - pixels * RENDER_BYTES_PER_PIXEL - TRANSIENT_BYTES


def per_cache_row(plan, pixels: int = PIXELS) -> float:
    pixel_space = plan.budget - left_after_pixels(plan.budget, pixels)
    return (plan.workspace - pixel_space) / max(plan.cache_rows, 1)


@pytest.mark.parametrize("share", [0.0, 0.003, 0.02])
def test_the_cache_holds_the_busiest_view_when_that_costs_little(share):
    plan = plan_gpu(SPEC, "clm", 24 * GIB, PIXELS, view_share=share)
    assert fits(plan) and plan.pieces == 1
    wanted = min(1.0, max(share * VIEW_SHARE_MARGIN, MIN_VIEW_SHARE))
    assert plan.cache_rows >= wanted * plan.max_gaussians
    # and nothing is left over that could have held more Gaussians
    per_more = plan.per_gaussian + wanted * (plan.workspace / max(plan.cache_rows, 1))
    assert plan.budget - plan.max_gaussians * plan.per_gaussian - plan.workspace < 2 * per_more
    assert "pieces" not in plan.describe("clm")


@pytest.mark.parametrize("share", [0.25, 0.57, 0.9])
def test_busy_views_no_longer_bound_the_scene(share):
    """A view too large for the cache is rendered in pieces, so the Gaussians take half of
    what the pixels leave and the cache the rest, for any share (no view bounds the scene)."""
    plan = plan_gpu(SPEC, "clm", 24 * GIB, PIXELS, view_share=share)
    left = left_after_pixels(plan.budget, PIXELS)
    assert fits(plan)
    assert plan.max_gaussians == int((1 - MAX_CACHE_SHARE) * left) // plan.per_gaussian
    rows_bytes = plan.cache_rows * per_cache_row(plan)
    assert left - plan.max_gaussians * plan.per_gaussian - rows_bytes < per_cache_row(plan)
    assert plan.cache_rows < share * plan.max_gaussians  # the busiest view does not fit whole
    assert plan.pieces == math.ceil(share * plan.max_gaussians / (PIECE_FILL * plan.cache_rows))
    assert f"in about {plan.pieces}" in plan.describe("clm")
    none = plan_gpu(SPEC, "none", 24 * GIB, PIXELS)
    assert plan.max_gaussians > 5 * none.max_gaussians
    # what sizing the cache for the whole busiest view would have allowed
    rows = min(1.0, share * VIEW_SHARE_MARGIN) * per_cache_row(plan)
    assert plan.max_gaussians > 2 * left / (plan.per_gaussian + rows)


def test_the_cache_never_falls_below_a_piece_of_a_few_tiles():
    pixels = 256 * 256  # small images: a piece of 64 tiles is a quarter of one
    plan = plan_gpu(SPEC, "clm", 2 * GIB, pixels, view_share=0.57)
    assert fits(plan) and plan.pieces > 1
    share = 0.57 * VIEW_SHARE_MARGIN
    floor = share * MIN_PIECE_PIXELS / pixels / PIECE_FILL
    assert plan.cache_rows >= floor * plan.max_gaussians
    # the rest went to Gaussians: one more would not fit with its share of the cache
    per_row = per_cache_row(plan, pixels)
    used = plan.max_gaussians * plan.per_gaussian + plan.workspace
    assert plan.budget - used < plan.per_gaussian + (floor + 1) * per_row


def test_views_that_see_less_allow_more_gaussians():
    counts = [plan_gpu(SPEC, "clm", 24 * GIB, PIXELS, s).max_gaussians for s in (0.5, 0.2, 0.02)]
    assert counts[0] <= counts[1] < counts[2]


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
    assert busiest_view_share(SPEC, params, views) == int(per_view.max()) / 3000
    assert (
        0 < busiest_view_share(SPEC, params, views[:1]) <= busiest_view_share(SPEC, params, views)
    )


def test_resident_rows_fit_beside_the_workspace_and_key_rows():
    """The rows of 52 floats (16 bytes a float: parameter, two moments, gradient) that fit a
    budget beside the plan's workspace and the key table's room."""
    from clm.offload.resident_rows import ResidentBudget

    budget = ResidentBudget(budget=10 * 2**30, workspace=3 * 2**30, per_gaussian=200)
    free = 10 * 2**30 * 0.95 - 3 * 2**30
    assert budget.slots(1000, 52) == int(free - 1000 * 200) // (16 * 52)
    assert budget.slots(2000, 52) == int(free - 2000 * 200) // (16 * 52)
    assert budget.slots(10**8, 52) == 0  # nothing left


def test_a_measured_budget_counts_what_steps_took_and_the_rows_added_since():
    """Measured: 6 GiB held between steps and at most 2 GiB more during one, with a quarter
    more kept for busier views and the dense Adam's temporary (2M rows of 52 floats), when the
    key table had room for 1000 rows; rows past those cost the plan's bytes each."""
    from clm.offload.resident_rows import ResidentBudget

    planned = ResidentBudget(budget=24 * GIB, workspace=20 * GIB, per_gaussian=300)
    measured = planned.measured(held=6 * GIB, step_most=2 * GIB, key_rows=1000, width=52)
    free = 24 * GIB * 0.95 - 6 * GIB - 2.5 * GIB - 2**21 * 52 * 4
    assert measured.slots(1000, 52) == int(free) // (16 * 52)
    assert measured.slots(500, 52) == int(free) // (16 * 52)  # compaction frees nothing here
    assert measured.slots(3000, 52) == int(free - 2000 * 300) // (16 * 52)
    assert measured.slots(1000, 52) > planned.slots(1000, 52)


def test_step_memory_reads_the_first_holdings_and_the_last_steps_peak():
    from clm.offload.step_memory import StepMemory

    readings = iter([(100, 150), (130, 900)])
    memory = StepMemory(torch.device("cpu"), steps=3, read=lambda device: next(readings))
    for _ in range(2):
        memory.start()  # only the first reads
        assert memory.finish() is None
    memory.start()
    assert memory.finish() == (130, 800)  # held after the last; the peak less the first holdings


def walk_plans(max_gaussians: int | None, host_gib: float = 120):
    """The factory's plans at 24 GiB (a 5% view share) with ``host_gib`` of host memory for
    rows of 12 bytes per host float; ``max_gaussians``: --max-gaussians."""

    def plans(spec):
        host_floats = sum(a.width for a in spec.host)
        per = 12 * host_floats + 4
        host = HostPlan(int(host_gib * GIB), 0, per, int(host_gib * GIB) // per, True)
        gpu = plan_gpu(spec, "clm", 24 * GIB, PIXELS, view_share=0.05)
        return _Plans(gpu, host, 0, max_gaussians)

    return plans


@pytest.mark.parametrize(
    ("offload", "device", "max_gaussians", "host_gib", "on_gpu"),
    [
        ("clm", "cuda", None, 120, False),  # the GPU plan binds: they would lower it
        ("clm", "cuda", 40_000_000, 120, True),  # --max-gaussians below both plans
        ("clm", "cuda", None, 30, True),  # the host plan binds, and they free host memory
        ("clm", "cpu", 40_000_000, 120, False),  # no walk on the CPU
        ("naive", "cuda", 40_000_000, 120, False),
    ],
)
def test_the_walks_rotations_stay_on_the_gpu_where_the_budgets_hold_them(
    offload, device, max_gaussians, host_gib, on_gpu
):
    cfg = EngineOptions(offload=offload, max_gpu_gb=24, max_gaussians=max_gaussians)
    plans = walk_plans(max_gaussians, host_gib)
    spec, chosen = _walk_on_gpu(SPEC, cfg, torch.device(device), render_torch, plans)
    assert spec["quats"].key == on_gpu
    assert [a.name for a in spec.key if a.name != "quats"] == ["means", "scales", "opacities"]
    base = plans(SPEC)
    # On the GPU the 4 rotation floats cost 12 bytes each (the value and two Adam moments);
    # the host rows lose 12 bytes each too.
    promoted = plans(SPEC.with_key(["quats"]))
    assert promoted.gpu.per_gaussian - base.gpu.per_gaussian == 48
    assert base.host.per_gaussian - promoted.host.per_gaussian == 48
    assert chosen.limit == (promoted if on_gpu else base).limit
    if on_gpu and offload == "clm" and device == "cuda":
        assert promoted.limit >= base.limit
    elif offload == "clm" and device == "cuda":
        assert promoted.limit < base.limit


def test_a_renderer_without_a_reach_keeps_the_spec():
    cfg = EngineOptions(offload="clm", max_gpu_gb=24, max_gaussians=1000)

    def no_reach(params, view, sh_degree, background):
        return render_torch(params, view, sh_degree, background)

    spec, _ = _walk_on_gpu(SPEC, cfg, torch.device("cuda"), no_reach, walk_plans(1000))
    assert spec is SPEC


def test_with_key_makes_attributes_key_and_refuses_unknown_ones():
    spec = SPEC.with_key(["quats", "means"])
    assert [a.name for a in spec.key] == ["means", "scales", "quats", "opacities"]
    assert [a.name for a in spec.host] == ["sh0", "shN"]  # sh_rest still last
    assert [a.name for a in SPEC.key] == ["means", "scales", "opacities"]  # unchanged
    with pytest.raises(ValueError, match="colour"):
        SPEC.with_key(["colour"])
