"""The batch planner, checked by simulating its schedule against the visibility it was given."""

import pytest
import torch

from clm.errors import ClmError
from clm.offload.plan import plan_batch


def simulate(plan, vis, capacity):
    """Replay the schedule; assert every render finds its rows and every row's gradient goes
    to the host exactly once per batch (final) or through the deferred path. Returns each row's
    load count and the most rows in the cache at once."""
    at = {int(i): p for p, i in enumerate(plan.ids.tolist())}  # a row's position in the batch
    positions = lambda ids: [at[int(i)] for i in ids.tolist()]  # noqa: E731
    slot_owner = {}
    peak = 0
    freed_at = {}  # slot -> micro-batch index whose flush freed it
    loads = {}
    final = {}
    deferred = {}
    for k, mb in enumerate(plan.micro):
        assert torch.equal(plan.ids[mb.render_pos], mb.render_ids)
        for pos, slot in zip(positions(mb.load_ids), mb.load_slots.tolist(), strict=True):
            assert 0 <= slot < plan.slots_needed <= capacity
            assert slot not in slot_owner, "slot reused while its row is live"
            if slot in freed_at:  # reuse only after the flush the load waits for
                assert freed_at[slot] <= mb.load_after
            slot_owner[slot] = pos
            loads[pos] = loads.get(pos, 0) + 1
        assert len(slot_owner) <= capacity
        peak = max(peak, len(slot_owner))
        assert sorted(mb.render_pos.tolist()) == torch.nonzero(vis[mb.view]).squeeze(1).tolist()
        for pos, slot in zip(mb.render_pos.tolist(), mb.render_slots.tolist(), strict=True):
            assert slot_owner.get(slot) == pos, "render reads a slot that holds another row"
        for kind, ids, slots in (
            ("f", mb.flush_ids, mb.flush_slots),
            ("d", mb.defer_ids, mb.defer_slots),
        ):
            for pos, slot in zip(positions(ids), slots.tolist(), strict=True):
                assert slot_owner.pop(slot) == pos
                freed_at[slot] = k
                target = final if kind == "f" else deferred
                target[pos] = target.get(pos, 0) + 1
    assert not slot_owner, "rows left in the cache at the end of the batch"
    union = torch.nonzero(vis.any(0)).squeeze(1).tolist()
    for pos in union:
        assert (pos in final) != (pos in deferred)
        if pos in final:
            assert final[pos] == 1 and loads[pos] == 1
    assert plan.loads == sum(loads.values())
    assert plan.uses == int(vis.sum())
    return loads, peak


def stretches(plan):
    """Stretches of a plan: a stretch's first view loads after the view before it is flushed."""
    return sum(mb.load_after == k - 1 for k, mb in enumerate(plan.micro))


def row_ids(vis):
    """Ascending global ids for the batch's rows, unlike their positions."""
    return torch.arange(vis.shape[1]) * 3 + 7


def random_vis(num_views, rows, seed, density=0.3):
    g = torch.Generator().manual_seed(seed)
    # Views along a path, each seeing a window of rows, like cameras along a street.
    vis = torch.zeros(num_views, rows, dtype=torch.bool)
    for v in range(num_views):
        lo = int(v * rows / (num_views + 2))
        width = int(rows * density)
        vis[v, lo : lo + width] = torch.rand(min(width, rows - lo), generator=g) < 0.8
    perm = torch.randperm(num_views, generator=g)
    vis = vis[perm]
    return vis[:, vis.any(0)]


@pytest.mark.parametrize("seed", range(4))
def test_plan_fits_in_one_stretch_when_cache_is_large(seed):
    vis = random_vis(12, 400, seed)
    plan = plan_batch(row_ids(vis), vis, capacity=vis.shape[1])
    assert stretches(plan) == 1
    loads, peak = simulate(plan, vis, vis.shape[1])
    assert all(v == 1 for v in loads.values())
    assert peak <= vis.shape[1]


@pytest.mark.parametrize("seed", range(4))
def test_slots_are_reused_after_two_microbatches(seed):
    vis = random_vis(16, 600, seed, density=0.15)
    union = vis.shape[1]
    plan = plan_batch(row_ids(vis), vis, capacity=union)
    _, peak = simulate(plan, vis, union)
    capacity = peak + max(int(vis[v].sum()) for v in range(vis.shape[0]))
    tight = plan_batch(row_ids(vis), vis, capacity=capacity)
    simulate(tight, vis, capacity)
    assert capacity < union  # ordering keeps the live set well below the union


@pytest.mark.parametrize("seed", range(4))
def test_overflow_splits_into_stretches_and_defers_shared_rows(seed):
    vis = random_vis(10, 300, seed, density=0.4)
    capacity = max(int(vis[v].sum()) for v in range(vis.shape[0])) + 5
    plan = plan_batch(row_ids(vis), vis, capacity=capacity)
    assert stretches(plan) > 1
    simulate(plan, vis, capacity)
    assert any(mb.defer_ids.numel() for mb in plan.micro)


def test_single_view_larger_than_cache_is_an_error():
    vis = torch.ones(2, 50, dtype=torch.bool)
    with pytest.raises(ClmError, match="cache holds 10"):
        plan_batch(torch.arange(50), vis, capacity=10)


def test_order_chains_neighbours():
    # Views along a line, shuffled: the chain must visit them in line order (or reversed).
    line = torch.zeros(6, 60, dtype=torch.bool)
    for v in range(6):
        line[v, v * 10 : v * 10 + 20] = True
    perm = [3, 0, 5, 1, 4, 2]
    order = plan_batch(torch.arange(60), line[perm], capacity=60).order
    walked = [perm[i] for i in order]
    assert walked in (list(range(6)), list(range(5, -1, -1)))


def test_a_cache_without_slots_is_one_clear_error():
    vis = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ClmError, match="no slot: raise --max-gpu-gb"):
        plan_batch(torch.arange(5), vis, capacity=0)
