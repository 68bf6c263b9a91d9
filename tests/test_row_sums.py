"""RowSums: per-row sums of gradient parts, against sums written out row by row."""

from __future__ import annotations

import pytest
import torch

from clm.offload.row_sums import RowSums


def _parts(seed: int, rows: int, calls: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calls of distinct rows each, rows repeating across calls; gradients in wider rows."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(calls):
        n = int(torch.randint(1, rows, (1,), generator=g))
        ids = torch.randperm(rows, generator=g)[:n]
        grads = torch.randn(n, width + 3, generator=g)[:, :width]  # strided rows
        parts.append((ids, grads))
    return parts


def _expected(parts) -> dict[int, list[float]]:
    """Each row's parts added one after another in float32, in arrival order."""
    sums: dict[int, torch.Tensor] = {}
    order: list[int] = []
    for ids, grads in parts:
        for r, row in zip(ids.tolist(), grads, strict=True):
            if r not in sums:
                sums[r] = row.clone()
                order.append(r)
            else:
                sums[r] = sums[r] + row
    return {r: sums[r] for r in order}


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_sums_match_row_by_row(use_native: bool, threads: int) -> None:
    sums = RowSums(width=6, threads=threads, block_shift=2, use_native=use_native)
    if use_native and sums._lib is None:
        pytest.skip("no C compiler")
    for batch in range(2):  # the second batch reuses the blocks after clear()
        parts = _parts(seed=batch, rows=23, calls=6, width=5)
        for ids, grads in parts:
            sums.add(ids, grads, row_count=23 + batch)
        expected = _expected(parts)
        got_rows, got = [], []
        for rows, summed in sums.sums(5):
            assert summed.shape == (rows.numel(), 5)
            got_rows += rows.tolist()
            got.append(summed)
        assert got_rows == list(expected)  # slots in arrival order, whatever the threads
        assert torch.equal(torch.cat(got), torch.stack(list(expected.values())))
        sums.clear()
        assert sums.count == 0 and bool((sums.slot_of == -1).all())
        assert sums.slot_of.numel() == 23 + batch


def test_narrower_width_leaves_other_columns_alone() -> None:
    sums = RowSums(width=4, threads=2, block_shift=3)
    sums.add(torch.tensor([5, 1]), torch.ones(2, 2), row_count=8)
    sums.add(torch.tensor([1]), torch.full((1, 2), 2.0), row_count=8)
    rows, summed = next(iter(sums.sums(2)))
    assert rows.tolist() == [5, 1]
    assert summed.tolist() == [[1.0, 1.0], [3.0, 3.0]]
