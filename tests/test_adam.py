"""Lazy sparse Adam (torch and native) against dense torch.optim.Adam.

Tolerances. The lazy update is the dense one except that (a) the k skipped zero-gradient steps
are applied at once in float64 instead of as k float32 steps, and (b) eps is dropped inside them.
(a) makes m and v differ by up to k float32 roundings (k <= 50: 50 * 2^-24 ~ 3e-6 relative) and
p by up to k/2 ulp of p (|p| < 4: 25 * 4.8e-7 ~ 1.2e-5 absolute, much less in practice because
roundings rarely align). (b) is eps / sqrt(v_hat) ~ 1e-7 relative of the skipped updates with
gradients ~0.1 and eps = 1e-8. Hence lazy vs dense: rtol 1e-5 with small absolute floors.
Native vs lazy torch do the same arithmetic; they differ only where torch's CPU float32 sqrt
(MKL VML) is not correctly rounded, which on some CPUs is up to ~20% of elements (by one ulp),
so that comparison is 10x tighter.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from clm.optim import native
from clm.optim.cpu_adam import CpuRowAdam
from clm.optim.lazy_adam import (
    AdamConfig,
    Segment,
    SkipTable,
    adam_step,
    lazy_catch_up,
    lazy_step_rows,
)

W = 48
SHIFT = 5  # 32 rows per chunk: the test rows span 8 chunks
N = 8 << SHIFT
STEPS = 50
# Column segments (SH degree 0, two higher bands) with their base learning rates.
SEGMENTS = [(0, 3, 5e-3), (3, 12, 1e-3), (12, 48, 2.5e-4)]
LR_DECAY = 0.97  # the schedule multiplies every lr by this at every step


def _store(param: torch.Tensor) -> SimpleNamespace:
    def chunks(t: torch.Tensor) -> list[torch.Tensor]:
        return [c.clone() for c in t.split(1 << SHIFT)]

    return SimpleNamespace(
        param_chunks=chunks(param),
        exp_avg_chunks=chunks(torch.zeros_like(param)),
        exp_avg_sq_chunks=chunks(torch.zeros_like(param)),
        last_chunks=chunks(torch.zeros(param.shape[0], dtype=torch.int32)),
    )


def _gather(store: SimpleNamespace) -> list[torch.Tensor]:
    names = ("param_chunks", "exp_avg_chunks", "exp_avg_sq_chunks", "last_chunks")
    return [torch.cat(getattr(store, n)) for n in names]


def _touch_schedule(gen: torch.Generator) -> list[torch.Tensor]:
    """Rows touched at each step (shuffled): never, rarely, often, always, or only at two
    steps far apart, so both short and long skips occur."""
    prob = torch.tensor([0.0, 0.03, 0.3, 0.7, 1.0])[torch.arange(N) % 5]
    prob[N // 2 : N // 2 + 12] = 0.0  # a run of never-touched rows across a chunk edge
    stretch = torch.arange(N) % 23 == 1  # touched at steps 1 and 44 only
    prob[stretch] = 0.0
    schedule = []
    for t in range(1, STEPS + 1):
        mask = torch.rand(N, generator=gen) < prob
        if t in (1, 44):
            mask |= stretch
        rows = mask.nonzero().flatten()
        schedule.append(rows[torch.randperm(rows.numel(), generator=gen)])
    return schedule


def _lrs(step: int) -> list[float]:
    return [lr * LR_DECAY**step for _, _, lr in SEGMENTS]


def _segments(tables: list[SkipTable], lrs: list[float]) -> list[Segment]:
    return [
        Segment(a, b, lr, tab) for (a, b, _), lr, tab in zip(SEGMENTS, lrs, tables, strict=True)
    ]


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9**4, 0.999**4)])
@pytest.mark.parametrize("eps", [1e-15, 1e-8])
@pytest.mark.parametrize("zero_share", [0.0, 0.4])
def test_lazy_matches_dense_adam(betas: tuple[float, float], eps: float, zero_share: float) -> None:
    """Touched rows whose gradient is all zero (occluded in every view) are skipped and caught
    up later; dense Adam steps them with a zero gradient. Both must agree."""
    gen = torch.Generator().manual_seed(1)
    config = AdamConfig(betas=betas, eps=eps)
    init = torch.randn(N, W, generator=gen)
    schedule = _touch_schedule(gen)

    dense = [init[:, a:b].clone() for a, b, _ in SEGMENTS]
    groups = [{"params": [p], "lr": lr} for p, (_, _, lr) in zip(dense, SEGMENTS, strict=True)]
    opt = torch.optim.Adam(groups, betas=betas, eps=eps, foreach=False)

    lazy = [init.clone(), torch.zeros(N, W), torch.zeros(N, W), torch.zeros(N, dtype=torch.int32)]
    natives = _store(init)
    fallbacks = _store(init)
    adam_native = CpuRowAdam(natives, config, threads=2)
    adam_fallback = CpuRowAdam(fallbacks, config, use_native=False)
    assert adam_native.native and not adam_fallback.native
    tables = [SkipTable(config) for _ in SEGMENTS]

    for t, rows in enumerate(schedule, start=1):
        grads = 0.1 * torch.randn(rows.numel(), W, generator=gen)
        grads[torch.rand(rows.numel(), generator=gen) < zero_share] = 0
        live = int(grads.ne(0).any(1).sum())
        lrs = _lrs(t)
        segs = _segments(tables, lrs)
        full = torch.zeros(N, W)
        full[rows] = grads
        for p, group, (a, b, _), lr in zip(dense, opt.param_groups, SEGMENTS, lrs, strict=True):
            p.grad = full[:, a:b].clone()
            group["lr"] = lr
        opt.step()

        assert lazy_step_rows(*lazy, rows, grads, t, segs) == live
        half = rows.numel() // 2  # two calls per step, as the offload pipeline makes them
        stepped = [
            adam_native.step_rows(rows[lo:hi], grads[lo:hi], W, t, segs)
            for lo, hi in ((0, half), (half, rows.numel()))
        ]
        assert sum(stepped) == live
        assert adam_fallback.step_rows(rows, grads, W, t, segs) == live
        for tab, lr in zip(tables, lrs, strict=True):
            tab.advance(t, lr)

    segs = _segments(tables, _lrs(STEPS))
    lazy_catch_up(*lazy, None, STEPS, segs)
    adam_native.catch_up(None, STEPS, segs)
    adam_fallback.catch_up(None, STEPS, segs)

    ref_p = torch.cat(dense, dim=1)
    ref_m = torch.cat([opt.state[p]["exp_avg"] for p in dense], dim=1)
    ref_v = torch.cat([opt.state[p]["exp_avg_sq"] for p in dense], dim=1)
    p, m, v, last = lazy
    assert (last == STEPS).all()
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-12)
    for store in (natives, fallbacks):
        sp, sm, sv, slast = _gather(store)
        assert torch.equal(slast, last)
        torch.testing.assert_close(sp, p, rtol=1e-6, atol=2e-7)
        torch.testing.assert_close(sm, m, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(sv, v, rtol=1e-6, atol=1e-13)
    # Never-touched rows keep their parameters bit for bit.
    never = torch.ones(N, dtype=torch.bool)
    never[torch.cat(schedule)] = False
    assert never.sum() > 40
    assert torch.equal(_gather(natives)[0][never], init[never])


@pytest.mark.parametrize("use_native", [True, False])
def test_catch_up_of_some_rows_then_continue(use_native: bool) -> None:
    """Catching up a subset mid-run (as before densification) must not change the result."""
    gen = torch.Generator().manual_seed(2)
    config = AdamConfig(betas=(0.9, 0.999), eps=1e-8)
    init = torch.randn(N, W, generator=gen)
    a_store, b_store = _store(init), _store(init)
    a = CpuRowAdam(a_store, config, threads=2)
    b = CpuRowAdam(b_store, config, threads=1, use_native=use_native)
    table = SkipTable(config)
    for t in range(1, 31):
        segs = [Segment(0, W, 1e-3 * 0.99**t, table)]
        rows = torch.randperm(N, generator=gen)[: N // 10]
        grads = 0.1 * torch.randn(rows.numel(), W, generator=gen)
        a.step_rows(rows, grads, W, t, segs)
        b.step_rows(rows, grads, W, t, segs)
        table.advance(t, segs[0].lr)
        if t % 7 == 0:
            b.catch_up(torch.arange(0, N, 3), t, segs)
    a.catch_up(None, 30, segs)
    b.catch_up(None, 30, segs)
    for x, y in zip(_gather(a_store), _gather(b_store), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("use_native", [True, False])
def test_catch_up_counts_the_rows_it_moves(use_native: bool) -> None:
    """A catch-up returns how many rows had steps pending: rows last stepped before ``upto``
    (and never-stepped ones), not rows already up to date or listed twice after their first."""
    gen = torch.Generator().manual_seed(4)
    config = AdamConfig()
    adam = CpuRowAdam(
        _store(torch.randn(N, W, generator=gen)), config, threads=2, use_native=use_native
    )
    table = SkipTable(config)
    both, first = torch.arange(0, N // 4), torch.arange(N // 4, N // 2)
    for t, rows in ((1, torch.cat([both, first])), (2, both)):
        segs = [Segment(0, W, 1e-3, table)]
        adam.step_rows(rows, torch.randn(rows.numel(), W, generator=gen), W, t, segs)
        table.advance(t, segs[0].lr)
    some = torch.arange(0, N, 5)  # from all three kinds
    want = int((some >= N // 4).sum())
    assert adam.catch_up(some, 2, segs) == want
    assert adam.catch_up(some, 2, segs) == 0
    assert adam.catch_up(None, 2, segs) == N - N // 4 - want


@pytest.mark.parametrize("use_native", [True, False])
def test_inactive_columns_untouched(use_native: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    config = AdamConfig()
    store = _store(torch.randn(N, W, generator=gen))
    for chunks in (store.exp_avg_chunks, store.exp_avg_sq_chunks):
        for c in chunks:
            c.copy_(torch.rand(c.shape, generator=gen))  # junk the update must never read
    before = [x.clone() for x in _gather(store)]
    adam = CpuRowAdam(store, config, threads=2, use_native=use_native)
    assert adam.native == use_native
    width = 12
    segs = [(0, 3, 2.5e-3), (3, 48, 1.25e-4)]
    tables = [SkipTable(config) for _ in segs]
    for t in range(1, 6):
        rows = torch.randperm(N, generator=gen)[: N // 3]
        grads = torch.randn(rows.numel(), W + 5, generator=gen)
        cur = [Segment(a, b, lr, tab) for (a, b, lr), tab in zip(segs, tables, strict=True)]
        adam.step_rows(rows, grads, width, t, cur)
        for tab, s in zip(tables, cur, strict=True):
            tab.advance(t, s.lr)
    adam.catch_up(None, 5, cur, width=width)
    after = _gather(store)
    for x, y in zip(before[:3], after[:3], strict=True):
        assert torch.equal(x[:, width:], y[:, width:])
        assert not torch.equal(x[:, :width], y[:, :width])


def test_never_skipped_rows_follow_torch_arithmetic() -> None:
    """Rows updated at every step get torch.optim.Adam's float32 values: m and v bit for bit,
    p to an ulp, because torch's CPU float32 sqrt (MKL VML) is off by an ulp in up to ~20% of
    elements on some CPUs while the kernel's sqrtf is correctly rounded."""
    gen = torch.Generator().manual_seed(4)
    config = AdamConfig(betas=(0.9, 0.999), eps=1e-8)
    init = torch.randn(N, W, generator=gen)
    ref = init.clone()
    opt = torch.optim.Adam([ref], lr=1e-2, betas=config.betas, eps=config.eps, foreach=False)
    store = _store(init)
    adam = CpuRowAdam(store, config, threads=2)
    dense = [init.clone(), torch.zeros(N, W), torch.zeros(N, W)]
    table = SkipTable(config)
    rows = torch.arange(N)
    for t in range(1, 21):
        grads = torch.randn(N, W, generator=gen)
        ref.grad = grads
        opt.step()
        adam_step(dense[0], grads, dense[1], dense[2], t, 1e-2, config)
        adam.step_rows(rows, grads, W, t, [Segment(0, W, 1e-2, table)])
        table.advance(t, 1e-2)
    assert torch.equal(dense[0], ref)
    assert torch.equal(dense[1], opt.state[ref]["exp_avg"])
    p, m, v, _ = _gather(store)
    assert torch.equal(m, opt.state[ref]["exp_avg"])
    assert torch.equal(v, opt.state[ref]["exp_avg_sq"])
    # A differing sqrt moves that step's update (~lr) by an ulp and may flip the rounding of p:
    # at most an ulp of max(|p|, lr) per step, 20 steps.
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp(min=1e-2)
    assert ((p - ref).abs() <= 20 * ulp).all()


def test_skip_table_matches_direct_sum() -> None:
    config = AdamConfig(betas=(0.9**4, 0.999**4))
    b1, b2 = config.betas
    table = SkipTable(config)
    lrs = [1e-3 * 0.95**t for t in range(1, 301)]
    for t, lr in enumerate(lrs, start=1):
        table.advance(t, lr)
    for t0 in (0, 1, 17, 150, 299, 300):
        direct = sum(
            lrs[tau - 1] * (1 - b2**tau) ** 0.5 / (1 - b1**tau) * (b1 / b2**0.5) ** (tau - t0)
            for tau in range(t0 + 1, 301)
        )
        assert table.sums[t0].item() == pytest.approx(direct, rel=1e-14, abs=0.0)
    assert table.window < 300  # truncation actually happened
    assert table.decay[1, 37].item() == pytest.approx(b2**37, rel=1e-15)


def test_rejects_misuse() -> None:
    """Tables at the wrong step, rows outside the store and bad widths fail loudly."""
    config = AdamConfig()
    adam = CpuRowAdam(_store(torch.zeros(N, W)), config)
    table = SkipTable(config)
    segs = [Segment(0, W, 1e-3, table)]
    rows, grads = torch.tensor([1, 2]), torch.zeros(2, W)
    with pytest.raises(ValueError, match="step"):
        adam.step_rows(rows, grads, W, 2, segs)  # table must be at step 1
    with pytest.raises(ValueError, match="step"):
        adam.catch_up(None, 1, segs)  # table must be at step 1
    with pytest.raises(ValueError, match="rows"):
        adam.step_rows(torch.tensor([0, N]), grads, W, 1, segs)
    with pytest.raises(ValueError, match="width"):
        adam.step_rows(rows, grads, W + 1, 1, segs)
    with pytest.raises(ValueError, match="segments"):
        adam.step_rows(rows, grads, W, 1, [Segment(0, 8, 1e-3, table), Segment(4, W, 1e-3, table)])
    with pytest.raises(ValueError, match="sqrt"):
        SkipTable(AdamConfig(betas=(0.95, 0.8)))


def test_native_builds_once_and_is_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CLM_CACHE_DIR", str(tmp_path))
    lib = native.library_path("cpu_adam")
    assert lib.is_file() and lib.is_relative_to(tmp_path)
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left behind

    def no_compiler(*args, **kwargs):
        raise AssertionError("recompiled a cached kernel")

    monkeypatch.setattr(native, "_compile", no_compiler)
    assert native.library_path("cpu_adam") == lib


def test_fallback_without_compiler(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="clm.optim.native"):
        assert native.load("cpu_adam") is None
        assert native.load("cpu_adam") is None
    assert len(caplog.records) == 1
    store = _store(torch.zeros(N, W))
    adam = CpuRowAdam(store, AdamConfig())
    assert not adam.native
    table = SkipTable(AdamConfig())
    adam.step_rows(torch.tensor([3, 40]), torch.ones(2, W), W, 1, [Segment(0, W, 0.1, table)])
    p = _gather(store)[0]
    assert torch.allclose(p[[3, 40]], torch.full((2, W), -0.1))


@pytest.mark.gpu
def test_lazy_on_gpu_matches_native_without_host_syncs() -> None:
    """The torch lazy update on CUDA (GPU-resident attributes) agrees with the native CPU
    kernel and never synchronises with the host."""
    gen = torch.Generator().manual_seed(5)
    config = AdamConfig(betas=(0.9**4, 0.999**4), eps=1e-15)
    cuda = torch.device("cuda")
    init = torch.randn(N, W, generator=gen)
    store = _store(init)
    adam = CpuRowAdam(store, config, threads=2)
    gpu = [init.to(cuda), torch.zeros(N, W, device=cuda), torch.zeros(N, W, device=cuda)]
    gpu.append(torch.zeros(N, dtype=torch.int32, device=cuda))
    cpu_tables = [SkipTable(config) for _ in SEGMENTS]
    gpu_tables = [SkipTable(config, cuda) for _ in SEGMENTS]
    dense = [init.to(cuda), torch.zeros(N, W, device=cuda), torch.zeros(N, W, device=cuda)]
    ref = init.to(cuda)
    opt = torch.optim.Adam([ref], lr=1e-3, betas=config.betas, eps=config.eps, foreach=False)
    for t in range(1, 31):
        rows = torch.randperm(N, generator=gen)[: N // 4]
        grads = 0.1 * torch.randn(rows.numel(), W, generator=gen)
        lrs = _lrs(t)
        adam.step_rows(rows, grads, W, t, _segments(cpu_tables, lrs))
        full = torch.randn(N, W, generator=gen).to(cuda)
        rows_gpu, grads_gpu = rows.to(cuda), grads.to(cuda)
        ref.grad = full
        opt.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            lazy_step_rows(*gpu, rows_gpu, grads_gpu, t, _segments(gpu_tables, lrs))
            adam_step(dense[0], full, dense[1], dense[2], t, 1e-3, config)
            for cpu_tab, gpu_tab, lr in zip(cpu_tables, gpu_tables, lrs, strict=True):
                cpu_tab.advance(t, lr)
                gpu_tab.advance(t, lr)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    adam.catch_up(None, 30, _segments(cpu_tables, _lrs(30)))
    torch.cuda.set_sync_debug_mode("error")
    try:
        lazy_catch_up(*gpu, torch.arange(0, N, 2, device=cuda), 30, _segments(gpu_tables, _lrs(30)))
        lazy_catch_up(*gpu, None, 30, _segments(gpu_tables, _lrs(30)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for x, y in zip(_gather(store), gpu, strict=True):
        torch.testing.assert_close(y.cpu(), x, rtol=1e-6, atol=1e-9)
    assert torch.equal(dense[0], ref)
