"""The schedule of one batch through the GPU row cache, computed once culling is done.

After culling, the batch's whole access sequence is known. The planner

1. orders the cameras so neighbours share as many rows as possible (a greedy chain on the
   overlap matrix), so rows live in the cache for short stretches;
2. gives each row a cache slot from its first use to its last use: it is loaded once, its
   gradient accumulates in the slot, and it is flushed to the host once, right after its last
   use, when the CPU Adam can start on it. A freed slot is reused only two micro-batches later,
   because the load of micro-batch k+1 is done while k renders;
3. when the rows live at once would not fit the cache, splits the batch into consecutive
   stretches that do fit. A row used in several stretches is loaded in each; its partial gradients
   are *deferred* (summed on the host, updated at the end of the batch), so Adam still sees the
   batch's total gradient exactly once.

The host learns the overlap and view sizes (one sync), then each view's loads and frees (one
more); splitting a batch takes a few more per stretch. Every per-row
result stays on the device, and each micro-batch's tensors are slices of a few per-stretch ones,
so building the schedule launches a dozen kernels whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from clm.errors import ClmError


@dataclass
class MicroBatch:
    """One view's work. Slots index the cache, ids are global rows, ``render_pos`` where the
    view's rows are in the batch's ``ids``. All are slices of a few per-stretch tensors: no
    kernel each."""

    view: int  # index into the batch's views as given
    load_slots: Tensor  # rows to gather before rendering
    load_ids: Tensor
    load_after: int  # micro-batch whose flush must finish before the load (-1: none)
    render_pos: Tensor  # rows this view renders
    render_slots: Tensor
    render_ids: Tensor
    flush_slots: Tensor  # rows whose gradient is final after this view (CPU Adam now)
    flush_ids: Tensor
    defer_slots: Tensor  # rows with a partial gradient (summed on the host, stepped at batch end)
    defer_ids: Tensor


@dataclass
class BatchPlan:
    ids: Tensor  # [U] ascending global row ids of the batch's union
    order: list[int]  # views in render order
    micro: list[MicroBatch] = field(default_factory=list)
    slots_needed: int = 0  # cache rows the slot numbers span (fresh slots go first)
    loads: int = 0  # rows gathered over the batch
    uses: int = 0  # rows rendered over the batch (sum over views)


def _chain(overlap: Tensor) -> list[int]:
    """The greedy chain on a host ``[B, B]`` overlap matrix.

    It starts from the view whose second-best neighbour is weakest: the end of a path of
    views has only one good neighbour.
    """
    num = overlap.shape[0]
    if num <= 2:
        return list(range(num))
    overlap = overlap.clone()
    overlap.fill_diagonal_(-1)
    current = int(torch.argmin(torch.sort(overlap, dim=1, descending=True).values[:, 1]))
    order, left = [current], set(range(num)) - {current}
    while left:
        rest = sorted(left)
        nxt = rest[int(torch.argmax(overlap[current, rest]))]
        order.append(nxt)
        left.remove(nxt)
        current = nxt
    return order


def overlap_and_uses(vis: Tensor) -> tuple[Tensor, list[int]]:
    """Rows shared by each pair of views (approximate: it only orders them) and rows each view
    sees (exact), in one host sync."""
    num = vis.shape[0]
    v = vis.float()
    both = torch.cat([(v @ v.T).double().flatten(), vis.sum(dim=1).double()]).cpu()
    return both[: num * num].view(num, num), [int(x) for x in both[num * num :].tolist()]


def _first_last(vis_seg: Tensor) -> tuple[Tensor, Tensor]:
    """First and last view index seeing each row; ``num_views`` for rows it never sees."""
    num = vis_seg.shape[0]
    as_int = vis_seg.to(torch.uint8)
    first = torch.argmax(as_int, dim=0)
    last = num - 1 - torch.argmax(torch.flip(as_int, dims=[0]), dim=0)
    absent = ~vis_seg.any(dim=0)
    return first.masked_fill(absent, num), last.masked_fill(absent, num)


def _fits(loads: list[int], frees: list[int], capacity: int) -> bool:
    """Slots suffice when every load finds slots freed two or more micro-batches earlier."""
    loaded = freed = 0
    for k, n in enumerate(loads):
        loaded += n
        if k >= 2:
            freed += frees[k - 2]
        if loaded > capacity + freed:
            return False
    return True


@dataclass
class _Stretch:
    start: int
    stop: int
    loads: list[int]  # rows first used at each view of the stretch
    frees: list[int]  # rows last used at each view of the stretch
    first: Tensor
    last: Tensor


def _counts(vis_o: Tensor, start: int, stop: int) -> _Stretch:
    """Loads and frees per view of ``vis_o[start:stop]``, in one wait for the device."""
    vis_seg = vis_o[start:stop]
    num = stop - start
    first, last = _first_last(vis_seg)
    # Histograms of a few bins over every row: bincount counts in shared memory, where a
    # scatter_add_ would queue every row's atomic on the same few addresses. It syncs to size
    # its output, just before the sync below.
    counts = torch.stack([torch.bincount(x, minlength=num + 1) for x in (first, last)])
    both = counts[:, :num].flatten().cpu().tolist()  # the one host sync of a stretch
    return _Stretch(start, stop, both[:num], both[num:], first, last)


def _stretches(vis_o: Tensor, capacity: int) -> list[_Stretch]:
    """Consecutive view ranges whose schedules fit; the whole batch when it fits."""
    num = vis_o.shape[0]
    stretches, start = [], 0
    while start < num:
        whole = _counts(vis_o, start, num)
        if _fits(whole.loads, whole.frees, capacity):
            stretches.append(whole)
            break
        best = _counts(vis_o, start, start + 1)
        if best.loads[0] > capacity:
            raise ClmError(
                f"one view needs {best.loads[0]} cache rows; the cache holds {capacity} "
                "(raise --max-gpu-gb, or cap the scene with --max-gaussians)"
            )
        lo, hi = start + 1, num - 1  # the largest stop in [lo, hi] that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            stretch = _counts(vis_o, start, mid)
            if _fits(stretch.loads, stretch.frees, capacity):
                lo, best = mid, stretch
            else:
                hi = mid - 1
        stretches.append(best)
        start = best.stop
    return stretches


def _slots(by_first: Tensor, by_last: Tensor, capacity: int, num_views: int, union: int) -> Tensor:
    """The cache slot of each loaded row, in load order.

    Loads take slots from a queue: the ``capacity`` fresh slots, then the slots of freed rows in
    the order they are freed. So load ``i >= capacity`` gets the slot of the row freed
    ``i - capacity``-th, which was loaded earlier: a pointer chase that ends at a fresh slot.
    Each step goes back at least two micro-batches, so pointer doubling ends within
    ``log2(num_views)`` rounds (no loop over micro-batches, no host sync).
    """
    present = by_first.numel()
    device = by_first.device
    if present <= capacity:
        return torch.arange(present, device=device)
    rank = torch.empty(union, dtype=torch.int64, device=device)
    rank[by_first] = torch.arange(present, device=device)
    parent = torch.cat([torch.arange(capacity, device=device), rank[by_last[: present - capacity]]])
    for _ in range(num_views.bit_length()):
        parent = parent[parent]
    return parent


def _shared_rows(vis_o: Tensor, stretches: list[_Stretch]) -> Tensor:
    """Rows loaded in more than one stretch: their gradients are deferred."""
    seen = torch.stack([vis_o[s.start : s.stop].any(dim=0) for s in stretches])
    return seen.sum(dim=0) > 1


def _schedule(
    plan: BatchPlan,
    stretch: _Stretch,
    vis_o: Tensor,
    uses: list[int],
    capacity: int,
    shared: Tensor | None,
) -> None:
    """Append the stretch's micro-batches to ``plan``."""
    ids, num, union = plan.ids, stretch.stop - stretch.start, vis_o.shape[1]
    present = sum(stretch.loads)
    plan.slots_needed = max(plan.slots_needed, min(capacity, present))
    by_first = torch.argsort(stretch.first, stable=True)[:present]
    if shared is None:
        by_last = torch.argsort(stretch.last, stable=True)[:present]
        finals, defers = stretch.frees, [0] * num
    else:  # per view, rows flushed for good first, then the deferred ones
        key = stretch.last * 2 + shared
        by_last = torch.argsort(key, stable=True)[:present]
        counts = torch.zeros(2 * num + 2, dtype=torch.int64, device=key.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        pairs = counts[: 2 * num].view(num, 2).cpu().tolist()
        finals, defers = [p[0] for p in pairs], [p[1] for p in pairs]
    slots = _slots(by_first, by_last, capacity, num, union)
    slot_of = torch.empty(union, dtype=torch.int64, device=vis_o.device)
    slot_of[by_first] = slots
    load_ids = ids[by_first]
    free_slots, free_ids = slot_of[by_last], ids[by_last]
    seen = torch.nonzero_static(
        vis_o[stretch.start : stretch.stop], size=sum(uses[stretch.start : stretch.stop])
    )[:, 1]
    seen_slots, seen_ids = slot_of[seen], ids[seen]

    a = f = r = 0
    for k in range(num):
        g = stretch.start + k
        n_load, n_final, n_defer, n_seen = stretch.loads[k], finals[k], defers[k], uses[g]
        load, final = slice(a, a + n_load), slice(f, f + n_final)
        defer, render = slice(f + n_final, f + n_final + n_defer), slice(r, r + n_seen)
        plan.micro.append(
            MicroBatch(
                view=plan.order[g],
                load_slots=slots[load],
                load_ids=load_ids[load],
                load_after=g - 2 if k >= 2 else stretch.start - 1,
                render_pos=seen[render],
                render_slots=seen_slots[render],
                render_ids=seen_ids[render],
                flush_slots=free_slots[final],
                flush_ids=free_ids[final],
                defer_slots=free_slots[defer],
                defer_ids=free_ids[defer],
            )
        )
        a, f, r = a + n_load, f + n_final + n_defer, r + n_seen
        plan.loads += n_load


def plan_batch(
    ids: Tensor,
    vis: Tensor,
    capacity: int,
    *,
    survey: tuple[Tensor, list[int]] | None = None,
    keep: Tensor | None = None,
) -> BatchPlan:
    """Schedule a culled batch (``vis [B, U]`` over rows ``ids``) through ``capacity`` slots.

    ``survey``: what
    :func:`overlap_and_uses` gave for ``vis``, if the caller already has it. ``keep [U]``
    marks rows that other plans of the same step also use: their gradients are deferred.
    """
    if capacity < 1:
        raise ClmError("the row cache has no slot: raise --max-gpu-gb")
    capacity = min(capacity, max(vis.shape[1], 1))  # slots beyond the union are never used
    overlap, per_view = survey if survey is not None else overlap_and_uses(vis)
    order = _chain(overlap)
    vis_o = vis[order]
    uses = [per_view[v] for v in order]
    plan = BatchPlan(ids=ids, order=order, uses=sum(uses))
    stretches = _stretches(vis_o, capacity)
    shared = _shared_rows(vis_o, stretches) if len(stretches) > 1 else None
    if keep is not None:
        shared = keep if shared is None else shared | keep
    for stretch in stretches:
        _schedule(plan, stretch, vis_o, uses, capacity, shared)
    return plan
