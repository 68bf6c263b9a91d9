"""GPU test of the gradient flush: rows whose gradient is zero stay on the GPU, the others land
in the staging ring packed in order (``pytest -m gpu``)."""

import types

import pytest
import torch

from clm.offload.flush import GradientFlush
from clm.offload.worker import wait_for

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("width", [3, 12, 48, 45])
def test_rows_without_gradient_stay_on_the_gpu(width):
    cuda = torch.device("cuda")
    g = torch.Generator(device=cuda).manual_seed(width)
    n = 5000
    grads = torch.randn(n, width, device=cuda, generator=g)
    zero = torch.rand(n, device=cuda, generator=g) < 0.75
    grads[zero] = 0
    grads[7, width - 1] = -0.0  # a negative zero is no gradient either
    grads[7, :-1] = 0
    grads[11, :] = 0
    grads[11, width - 1] = 1e-30  # one tiny value is a gradient
    ids = torch.randperm(10 * n, device=cuda, generator=g)[:n]
    host = types.SimpleNamespace(width=48, adam=types.SimpleNamespace(threads=2))
    flush = GradientFlush(host, cuda, staging_rows=1 << 14)
    assert flush.can_compact
    flush.staging.acquire(17)  # start the ring off zero
    start, done = flush._download(grads, ids)
    wait_for(done)
    keep = (grads != 0).any(dim=1)
    m = int(flush.staging.filled[start])
    assert m == int(keep.sum()) and 0 < m < n
    assert torch.equal(flush.staging.rows[start : start + m], ids[keep].cpu())
    assert torch.equal(flush.staging.grads_view(start, m, width), grads[keep].cpu())
    flush.close()


def _flush_through_a_recording_adam(n, width, zero_share, seed, compact):
    """Flush ``n`` rows of a shuffled cache (``zero_share`` of them without gradient) to a
    host whose CPU Adam records what it is given; returns the inputs, what it got, in how
    many parts, and the flush (closed)."""
    cuda = torch.device("cuda")
    g = torch.Generator(device=cuda).manual_seed(seed)
    ids = torch.randperm(20 * n, device=cuda, generator=g)[:n]
    slots = torch.randperm(n, device=cuda, generator=g)
    cache_grad = torch.randn(n, width, device=cuda, generator=g)
    cache_grad[torch.rand(n, device=cuda, generator=g) < zero_share] = 0
    seen = []

    def step_rows(rows, grads, width, step):
        seen.append((rows.clone(), grads.clone()))
        return int(grads.ne(0).any(dim=1).sum())

    host = types.SimpleNamespace(width=width, adam=types.SimpleNamespace(threads=2))
    host.step_rows = step_rows
    flush = GradientFlush(host, cuda, staging_rows=1 << 12)
    flush.flush(cache_grad, ids, slots, width, step=1, compact=compact)
    flush.drain()
    flush.close()
    rows = torch.cat([r for r, _ in seen])
    grads = torch.cat([x for _, x in seen])
    return ids, cache_grad[slots], rows, grads, len(seen), flush


def test_flush_sends_the_rows_with_gradient_in_address_order():
    """Whatever order the cache holds them in, rows reach the CPU Adam ascending, each with
    its own gradient, and the rows without gradient do not reach it."""
    ids, sent, rows, grads, parts, _ = _flush_through_a_recording_adam(5000, 8, 0.6, 1, True)
    assert parts == 3  # parts of half the ring
    kept = sent.ne(0).any(dim=1)
    order = torch.argsort(ids[kept])
    assert torch.equal(rows, ids[kept][order].cpu())
    assert torch.equal(grads, sent[kept][order].cpu())


def test_flush_without_compaction_copies_every_row():
    """``compact=False`` (rows a walk found read): every row reaches the CPU Adam in address
    order with its own gradient, the zero ones too, for it to skip."""
    n = 3000
    ids, sent, rows, grads, _, flush = _flush_through_a_recording_adam(n, 12, 0.3, 3, False)
    order = torch.argsort(ids)
    assert torch.equal(rows, ids[order].cpu())
    assert torch.equal(grads, sent[order].cpu())
    kept = int(sent.ne(0).any(dim=1).sum())
    assert flush.rows_sent == flush.rows_flushed == n
    assert flush.rows_stepped == kept < n
