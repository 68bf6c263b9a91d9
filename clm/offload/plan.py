"""The schedule of one batch through the GPU row cache, computed once culling is done.

After culling, the batch's whole access sequence is known. The planner

1. orders the cameras so neighbours share as many rows as possible (a greedy chain on the
   overlap matrix), so rows live in the cache for short stretches;
2. gives each row a cache slot from its first use to its last use: it is loaded once, its
   gradient accumulates in the slot, and it is flushed to the host once, right after its last
   use, when the CPU Adam can start on it. A freed slot is reused only two micro-batches later,
   because the load of micro-batch k+1 runs while k renders;
3. when the rows live at once would not fit the cache, splits the batch into consecutive
   segments that do fit. A row used in several segments is loaded in each; its partial gradients
   are *deferred* (summed on the host, updated at the end of the batch), so Adam still sees the
   batch's total gradient exactly once.

Sizes come to the host in one small sync per batch (two per segment when splitting); everything
per row stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from clm.errors import ClmError


@dataclass
class MicroBatch:
    """One view's work. Positions index the batch's ``ids``; slots index the cache."""

    view: int  # index into the batch's views as given
    load_pos: Tensor  # rows to gather before rendering
    load_slots: Tensor
    load_after: int  # micro-batch whose flush must finish before the load (-1: none)
    render_pos: Tensor  # rows this view renders
    render_slots: Tensor
    flush_pos: Tensor  # rows whose gradient is final after this view (CPU Adam now)
    flush_slots: Tensor
    defer_pos: Tensor  # rows with a partial gradient (summed on the host, updated at batch end)
    defer_slots: Tensor


@dataclass
class BatchPlan:
    ids: Tensor  # [U] ascending global row ids of the batch's union
    order: list[int]  # views in render order
    micro: list[MicroBatch] = field(default_factory=list)
    segments: int = 1
    peak_slots: int = 0  # rows in the cache at once, at most
    slots_needed: int = 0  # cache rows the slot numbers span (fresh slots go first)
    loads: int = 0  # rows gathered over the batch
    uses: int = 0  # rows rendered over the batch (sum over views)


def order_views(vis: Tensor) -> list[int]:
    """A chain through the views that greedily maximises the rows shared by neighbours."""
    return _chain(_overlap_and_uses(vis)[0])


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


def _overlap_and_uses(vis: Tensor) -> tuple[Tensor, list[int]]:
    """Rows shared by each pair of views (approximate: it only orders them) and rows each view
    sees (exact), in one host sync."""
    num = vis.shape[0]
    v = vis.float()
    both = torch.cat([(v @ v.T).double().flatten(), vis.sum(dim=1).double()]).cpu()
    return both[: num * num].view(num, num), [int(x) for x in both[num * num :].tolist()]


def masked_positions(mask: Tensor, count: int) -> Tensor:
    """``nonzero(mask)`` without a host sync, given the number of True entries."""
    idx = torch.cumsum(mask, 0) - 1
    out = torch.empty(count + 1, dtype=torch.int64, device=mask.device)
    target = torch.where(mask, idx, torch.full_like(idx, count))
    out.scatter_(0, target, torch.arange(mask.numel(), device=mask.device))
    return out[:count]


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
class _Segment:
    start: int
    stop: int
    loads: list[int]  # rows first used at each view of the segment
    frees: list[int]  # rows last used at each view of the segment
    first: Tensor
    last: Tensor


def _counts(vis_o: Tensor, start: int, stop: int) -> _Segment:
    vis_seg = vis_o[start:stop]
    num = stop - start
    first, last = _first_last(vis_seg)
    counts = torch.zeros(2, num + 1, dtype=torch.int64, device=vis_o.device)
    ones = torch.ones_like(first)
    counts[0].scatter_add_(0, first, ones)  # (bincount would sync to find its length)
    counts[1].scatter_add_(0, last, ones)
    both = counts[:, :num].flatten().cpu().tolist()  # the one host sync of a segment
    return _Segment(start, stop, both[:num], both[num:], first, last)


def _segment(vis_o: Tensor, capacity: int) -> list[_Segment]:
    """Consecutive view ranges whose schedules fit; the whole batch when it fits."""
    num = vis_o.shape[0]
    segments, start = [], 0
    while start < num:
        whole = _counts(vis_o, start, num)
        if _fits(whole.loads, whole.frees, capacity):
            segments.append(whole)
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
            seg = _counts(vis_o, start, mid)
            if _fits(seg.loads, seg.frees, capacity):
                lo, best = mid, seg
            else:
                hi = mid - 1
        segments.append(best)
        start = best.stop
    return segments


def plan_batch(ids: Tensor, vis: Tensor, capacity: int) -> BatchPlan:
    """Schedule a culled batch (``vis [B, U]`` over rows ``ids``) through ``capacity`` slots."""
    if capacity < 1:
        raise ValueError("the row cache needs at least one slot")
    device = vis.device
    capacity = min(capacity, max(vis.shape[1], 1))  # slots beyond the union are never used
    overlap, per_view = _overlap_and_uses(vis)
    order = _chain(overlap)
    vis_o = vis[order]
    plan = BatchPlan(ids=ids, order=order)
    segments = _segment(vis_o, capacity)
    plan.segments = len(segments)
    if len(segments) > 1:
        seen = torch.stack([vis_o[s.start : s.stop].any(dim=0) for s in segments])
        multi = seen.sum(dim=0) > 1  # rows loaded in more than one segment: deferred
    else:
        multi = torch.zeros(vis.shape[1], dtype=torch.bool, device=device)
    uses = [per_view[v] for v in order]
    plan.uses = sum(uses)

    for seg in segments:
        present = sum(seg.loads)
        plan.slots_needed = max(plan.slots_needed, min(capacity, present))
        by_first = torch.argsort(seg.first, stable=True)[:present]
        by_last = torch.argsort(seg.last, stable=True)[:present]
        slot_of = torch.full((vis.shape[1],), -1, dtype=torch.int64, device=device)
        queue = torch.empty(capacity + present, dtype=torch.int64, device=device)
        queue[:capacity] = torch.arange(capacity, device=device)
        a_off, f_off = [0], [0]
        for n in seg.loads:
            a_off.append(a_off[-1] + n)
        for n in seg.frees:
            f_off.append(f_off[-1] + n)
        live = 0
        for k in range(seg.stop - seg.start):
            g = seg.start + k
            if k >= 2:
                freed = by_last[f_off[k - 2] : f_off[k - 1]]
                queue[capacity + f_off[k - 2] : capacity + f_off[k - 1]] = slot_of[freed]
            new = by_first[a_off[k] : a_off[k + 1]]
            slot_of[new] = queue[a_off[k] : a_off[k + 1]]
            live += seg.loads[k]
            plan.peak_slots = max(plan.peak_slots, live)
            live -= seg.frees[k]
            render_pos = masked_positions(vis_o[g], uses[g])
            flushing = by_last[f_off[k] : f_off[k + 1]]
            if plan.segments > 1:
                deferred = multi[flushing]
                final_pos, defer_pos = flushing[~deferred], flushing[deferred]
            else:
                final_pos, defer_pos = flushing, flushing[:0]
            plan.micro.append(
                MicroBatch(
                    view=order[g],
                    load_pos=new,
                    load_slots=slot_of[new],
                    load_after=g - 2 if k >= 2 else seg.start - 1,
                    render_pos=render_pos,
                    render_slots=slot_of[render_pos],
                    flush_pos=final_pos,
                    flush_slots=slot_of[final_pos],
                    defer_pos=defer_pos,
                    defer_slots=slot_of[defer_pos],
                )
            )
            plan.loads += seg.loads[k]
    return plan
