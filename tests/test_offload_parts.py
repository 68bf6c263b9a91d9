"""The pieces of the offload path on their own: host store, culling, gather twin, staging ring."""

import threading
import time

import pytest
import torch
from test_engines import make_params, ring_views

from clm.errors import ClmError
from clm.model.table import Compaction
from clm.offload import host_store as host_store_module
from clm.offload.culling import Culler
from clm.offload.gather import RowGather
from clm.offload.host_store import HostStore
from clm.offload.worker import BackgroundQueue, StagingRing
from clm.render.projection import project


def dense(store: HostStore) -> tuple[torch.Tensor, ...]:
    """Every row's parameters and moments, read back through ``HostStore.rows``."""
    parts = [store.rows(start, start + n) for _, _, start, n in store.chunk_slices(0, len(store))]
    return tuple(torch.cat([p[k] for p in parts]) for k in range(3))


def filled_store(rows: int, width: int = 5, shift: int = 4) -> tuple[HostStore, torch.Tensor]:
    store = HostStore(width, chunk_shift=shift)
    values = torch.arange(rows * width, dtype=torch.float32).view(rows, width)
    store.append(values[: rows // 2], step=3)
    store.append(values[rows // 2 :], step=4)  # grows chunk by chunk, no reallocation
    return store, values


def test_host_store_grows_in_chunks_and_keeps_rows():
    store, values = filled_store(100)
    assert len(store) == 100
    assert len(store.param_chunks) == 7  # 16 rows per chunk
    first_chunk = store.param_chunks[0]
    store.append(torch.zeros(10, 5), step=5)
    assert store.param_chunks[0] is first_chunk  # earlier chunks are never copied
    params, m, v = dense(store)
    assert torch.equal(params[:100], values)
    assert (m == 0).all() and (v == 0).all()
    assert store.last_chunks[0][0] == 3 and store.last_chunks[6][100 - 96 - 1] == 4


def test_host_store_compaction_fills_holes_from_the_tail_and_frees_chunks():
    store, values = filled_store(100)
    keep = torch.ones(100, dtype=torch.bool)
    keep[[0, 5, 50, 97]] = False
    keep[40:90] = False
    plan = Compaction.from_keep(keep)
    store.compact(plan)
    assert len(store) == int(keep.sum())
    assert len(store.param_chunks) == -(-len(store) // 16)
    # Same result as applying the plan to a plain tensor.
    expected = plan.apply_(values.clone())
    assert torch.equal(dense(store)[0], expected)
    assert sorted(dense(store)[0][:, 0].tolist()) == sorted(values[keep][:, 0].tolist())


def test_host_store_budget_refuses_before_changing_anything():
    store = HostStore(48, chunk_shift=10, max_bytes=3 * (1 << 10) * (3 * 48 * 4 + 4))
    store.append(torch.ones(2048, 48), step=0)
    with pytest.raises(ClmError, match="max-host-gb"):
        store.append(torch.ones(2000, 48), step=0)
    assert len(store) == 2048 and len(store.param_chunks) == 2
    store.append(torch.ones(1024, 48), step=0)  # the budget holds exactly 3 x 1024 rows
    with pytest.raises(ClmError, match="max-host-gb"):
        store.append(torch.ones(1, 48), step=0)
    assert len(store) == 3 * 1024


def test_host_store_refuses_when_the_os_is_out_of_memory(monkeypatch):
    store = HostStore(48, chunk_shift=10)
    monkeypatch.setattr(host_store_module, "available_host_bytes", lambda: 1 << 30)
    with pytest.raises(ClmError, match="host memory would run out"):
        store.append(torch.ones(10, 48), step=0)
    assert len(store) == 0


def test_culling_is_a_conservative_superset_of_what_the_rasterizer_draws():
    params = make_params(5000, seed=4)
    params["scales"] = params["scales"] + torch.randn(5000, 3) * 0.7  # some large, some tiny
    views = ring_views(8)
    culled = Culler(torch.device("cpu"), chunk=1 << 11).cull(
        params["means"], params["scales"], params["opacities"], views
    )
    assert torch.equal(culled.ids, torch.sort(culled.ids).values)
    for c, view in enumerate(views):
        proj = project(
            params["means"],
            params["quats"],
            torch.exp(params["scales"]),
            torch.sigmoid(params["opacities"]),
            view.viewmat,
            view.K,
            view.width,
            view.height,
        )
        drawn = set(torch.nonzero(proj.visible).squeeze(1).tolist())
        kept = set(culled.ids[culled.vis[c]].tolist())
        assert drawn <= kept
        assert len(kept) < 5000 * 0.6  # and most of the scene is culled for each view


def test_visit_counts_over_many_views_match_the_cull_of_each():
    """Counts over more views than one culling pass takes (64), in several row chunks, against
    each view culled alone."""
    params = make_params(3000, seed=6)
    views = ring_views(70)
    culler = Culler(torch.device("cpu"), chunk=1 << 10)
    args = (params["means"], params["scales"], params["opacities"])
    alone = [culler.cull(*args, [view]) for view in views]
    per_row = torch.zeros(3000, dtype=torch.int32)
    for culled in alone:
        per_row[culled.ids] += 1
    assert torch.equal(culler.visit_counts(*args, views), per_row)
    assert culler.visible_counts(*args, views) == [c.ids.numel() for c in alone]
    assert int(per_row.min()) < int(per_row.max()) and int(per_row.max()) > 1


def test_more_cameras_than_one_pass_culls_is_one_clear_error():
    params = make_params(10)
    with pytest.raises(ClmError, match="at most 64 cameras are culled together, got 65"):
        Culler(torch.device("cpu")).cull(
            params["means"], params["scales"], params["opacities"], ring_views(65)
        )


def test_culling_sees_a_view_moved_in_place():
    params = make_params(2000, seed=5)
    views = ring_views(3)
    culler = Culler(torch.device("cpu"))
    before = culler.cull(params["means"], params["scales"], params["opacities"], views)
    views[1].viewmat[:3, 3] += torch.tensor([0.0, 1.5, 0.0])  # a pose optimiser's in-place step
    after = culler.cull(params["means"], params["scales"], params["opacities"], views)
    fresh = Culler(torch.device("cpu")).cull(
        params["means"], params["scales"], params["opacities"], views
    )
    assert torch.equal(after.ids, fresh.ids) and torch.equal(after.vis, fresh.vis)
    assert not (torch.equal(after.ids, before.ids) and torch.equal(after.vis, before.vis))


def test_culling_drops_transparent_and_behind_camera_gaussians():
    params = make_params(3, seed=0)
    view = ring_views(1)[0]
    fwd = view.viewmat[2, :3]
    eye = view.camera_center
    params["means"] = torch.stack([eye + 2 * fwd, eye - 2 * fwd, eye + 2 * fwd])
    params["scales"] = torch.full((3, 3), -3.0)
    params["opacities"] = torch.tensor([0.0, 0.0, -8.0])  # the third is below 1/255
    culled = Culler(torch.device("cpu")).cull(
        params["means"], params["scales"], params["opacities"], [view]
    )
    assert culled.ids.tolist() == [0]


def test_gather_twin_copies_the_active_columns_and_zeroes_gradients():
    store, values = filled_store(100, width=6)
    gather = RowGather(store, torch.device("cpu"))
    out = torch.full((10, 6), -1.0)
    grad = torch.ones(10, 6)
    rows, slots = torch.tensor([99, 0, 17, 64]), torch.tensor([3, 9, 0, 5])
    gather.gather(rows, slots, 4, out, grad)
    assert torch.equal(out[slots, :4], values[rows, :4])
    assert (out[slots, 4:] == -1).all() and (grad[slots, :4] == 0).all()
    assert (grad[slots, 4:] == 1).all() and (out[[1, 2, 4, 6, 7, 8]] == -1).all()


def test_staging_ring_blocks_until_released_and_wraps():
    ring = StagingRing(10, 2, pinned=False)
    assert ring.acquire(6) == 0
    assert ring.acquire(3) == 6
    got = []

    def take():
        got.append(ring.acquire(4))  # does not fit before the first release: waits

    thread = threading.Thread(target=take)
    thread.start()
    time.sleep(0.05)
    assert not got
    ring.release()  # frees rows 0..5: the request wraps to the start
    thread.join(timeout=5)
    assert got == [0]


def test_staging_ring_pins_nothing_until_used_and_resizes_only_when_empty():
    ring = StagingRing(10, 2, pinned=False)
    assert ring.grads.numel() == ring.rows.numel() == 0
    assert ring.acquire(4) == 0
    assert ring.grads.shape == (10, 2) and ring.rows.shape == ring.filled.shape == (10,)
    with pytest.raises(RuntimeError, match="handed out"):
        ring.fit(20)
    ring.release()
    ring.fit(20)
    assert ring.grads.numel() == 0
    assert ring.acquire(15) == 0 and ring.grads.shape == (20, 2)


def test_flush_hands_the_cpu_adam_its_rows_in_address_order():
    """Rows leave in ascending id order, each with its own gradient, whatever order the cache
    holds them in (the CPU Adam then walks host memory forwards)."""
    from types import SimpleNamespace

    from clm.offload import flush as flush_module

    seen = []

    def step_rows(rows, grads, width, step):
        seen.append((rows.clone(), grads.clone()))
        return rows.numel()

    host = SimpleNamespace(width=6, adam=SimpleNamespace(threads=1), step_rows=step_rows)
    flush = flush_module.GradientFlush(host, torch.device("cpu"), staging_rows=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(1000, generator=g)[:150]
    slots = torch.randperm(200, generator=g)[:150]
    cache_grad = torch.randn(200, 6, generator=g)
    flush.flush(cache_grad, ids, slots, 4, step=1)
    flush.drain()
    flush.close()
    assert len(seen) == 5  # parts of half the ring
    rows = torch.cat([r for r, _ in seen])
    grads = torch.cat([x for _, x in seen])
    assert torch.equal(rows, torch.sort(ids).values)
    by_id = dict(zip(ids.tolist(), cache_grad[slots, :4], strict=True))
    assert torch.equal(grads, torch.stack([by_id[r] for r in rows.tolist()]))


def test_background_queue_reports_errors_in_the_caller():
    queue = BackgroundQueue("test")

    def boom():
        raise RuntimeError("disk full")

    queue.submit(boom)
    with pytest.raises(RuntimeError, match="disk full"):
        queue.drain()
    queue.close()


@pytest.mark.parametrize(("chunk_rows", "located"), [(1000, False), (16, True), (7, False)])
def test_key_adam_over_chunks_matches_dense_adam(chunk_rows, located):
    from clm.model.spec import gaussian_splatting_spec
    from clm.offload.lazy_rows import DeviceRows
    from clm.optim.lazy_adam import AdamConfig
    from clm.optim.learning_rates import LearningRates

    spec = gaussian_splatting_spec(3)
    params = make_params(50, seed=2)
    lrs = LearningRates(spec, 10, extent=1.0, batch_size=1)
    config = AdamConfig((0.9, 0.999), 1e-15)
    rows = DeviceRows(spec.key, params, lrs, config, torch.device("cpu"), chunk_rows=chunk_rows)
    ref = {a.name: params[a.name].clone().requires_grad_() for a in spec.key}
    assert set(ref) == {"means", "scales", "opacities"}
    optim = torch.optim.Adam(
        [{"params": [t], "lr": lrs.at(n, 1)} for n, t in ref.items()], betas=(0.9, 0.999), eps=1e-15
    )
    g = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        seen = torch.randperm(50, generator=g)[:20].sort().values  # two fifths of the rows
        grads = torch.randn(20, rows.width, generator=g)
        if located:  # (where the chunks begin is found ahead, as the engine does)
            rows.step_sparse(seen, grads, step, rows.locate(seen))
        else:
            rows.step_sparse(seen, grads, step)
        dense = torch.zeros(50, rows.width)
        dense[seen] = grads
        for n, t in ref.items():
            seg = next(s for s in rows.layout if s.attr.name == n)
            t.grad = dense[:, seg.start : seg.end].reshape(t.shape).clone()
        for group, n in zip(optim.param_groups, ref, strict=True):
            group["lr"] = lrs.at(n, step)  # the position lr decays
        optim.step()
    for n, t in ref.items():
        torch.testing.assert_close(rows.views()[n], t.detach(), rtol=1e-6, atol=1e-7)


def test_row_inputs_send_gradients_to_their_sinks():
    """Render inputs from two packed tables: the views match the rows, and backward adds the
    gradients (zeros for an attribute the loss ignores) into each sink at its positions, as
    autograd through plain indexing would."""
    from clm.model.spec import gaussian_splatting_spec, row_layout, unpack_rows
    from clm.offload.row_inputs import RowInputs, Source

    spec = gaussian_splatting_spec(3)
    key_layout, key_width = row_layout(spec.key)
    host_layout, host_width = row_layout(spec.host)
    g = torch.Generator().manual_seed(3)
    key_table = torch.randn(30, key_width, generator=g)
    cache = torch.randn(12, host_width, generator=g)
    ids, pos = torch.tensor([4, 9, 17, 2]), torch.tensor([0, 3, 5, 6])
    slots = torch.tensor([7, 1, 10, 3])
    degree, width = 1, 16  # quats, sh0 and the first three rest bands
    key_sink, cache_sink = torch.zeros(8, key_width), torch.zeros(12, host_width)
    inputs = RowInputs([key_layout, host_layout])
    got = inputs.gather(
        (
            Source(key_table, ids, key_sink, pos),
            Source(cache, slots, cache_sink[:, :width], slots),
        ),
        degree,
    )
    weights = {n: torch.randn(t.shape, generator=g) for n, t in got.items() if n != "quats"}
    sum((got[n] * w).sum() for n, w in weights.items()).backward()

    key_leaf = key_table[ids].requires_grad_()
    host_leaf = cache[slots, :width].requires_grad_()
    ref = unpack_rows(key_leaf, key_layout) | unpack_rows(host_leaf, host_layout, degree)
    for n, t in ref.items():
        torch.testing.assert_close(got[n], t, rtol=0, atol=0)
    sum((ref[n] * w).sum() for n, w in weights.items()).backward()
    torch.testing.assert_close(key_sink[pos], key_leaf.grad)
    torch.testing.assert_close(cache_sink[slots, :width], host_leaf.grad)
    assert not key_sink[[1, 2, 4, 7]].any() and not cache_sink[:, width:].any()


@pytest.mark.parametrize("degree", [0, 1, 3])
@pytest.mark.parametrize("weighted", ["joined", "members", "both"])
def test_joined_sh_inputs_view_the_rows_and_send_gradients_back(degree, weighted, monkeypatch):
    """The joined SH input is ``sh0`` and the active ``shN`` bands side by side, with no copy
    of the gathered rows; gradients through it, through the attributes or through both add
    into the sink as autograd through plain indexing and ``torch.cat`` would. Inputs the loss
    does not read hand backward no gradient (not a zero-filled one of every row)."""
    from clm.model.spec import gaussian_splatting_spec, row_layout, unpack_rows
    from clm.offload import row_inputs
    from clm.offload.row_inputs import RowInputs, Source
    from clm.render.splats import JOINED_INPUTS, SH_COEFFS

    packed_from = []  # per group, the (column, width) of each gradient backward was given
    real = row_inputs._packed_gradient

    def spy(pieces, n, sink):
        packed_from.append(sorted((a, w) for a, w, _ in pieces))
        return real(pieces, n, sink)

    monkeypatch.setattr(row_inputs, "_packed_gradient", spy)

    spec = gaussian_splatting_spec(3)
    key_layout, key_width = row_layout(spec.key)
    host_layout, host_width = row_layout(spec.host)
    width = 4 + 3 * (degree + 1) ** 2  # quats, sh0 and the active rest bands
    g = torch.Generator().manual_seed(degree)
    key_table = torch.randn(9, key_width, generator=g)
    cache = torch.randn(6, host_width, generator=g)
    ids, slots = torch.tensor([3, 8, 1]), torch.tensor([5, 0, 2])
    key_sink, cache_sink = torch.zeros(9, key_width), torch.zeros(6, host_width)
    inputs = RowInputs([key_layout, host_layout], JOINED_INPUTS)
    got = inputs.gather(
        (
            Source(key_table, ids, key_sink, ids),
            Source(cache, slots, cache_sink[:, :width], slots),
        ),
        degree,
    )
    joined = got[SH_COEFFS]
    assert joined.shape == (3, (degree + 1) ** 2, 3)
    assert joined.data_ptr() == got["sh0"].data_ptr()  # a view, not a copy

    host_leaf = cache[slots, :width].requires_grad_()
    ref = unpack_rows(host_leaf, host_layout, degree)
    ref[SH_COEFFS] = torch.cat([ref["sh0"], ref["shN"]], dim=1)
    torch.testing.assert_close(joined, ref[SH_COEFFS], rtol=0, atol=0)
    names = {"joined": [SH_COEFFS], "members": ["sh0", "shN"], "both": [SH_COEFFS, "sh0"]}
    weights = {n: torch.randn(ref[n].shape, generator=g) for n in names[weighted]}
    sum((got[n] * w).sum() for n, w in weights.items()).backward()
    sum((ref[n] * w).sum() for n, w in weights.items()).backward()
    torch.testing.assert_close(cache_sink[slots, :width], host_leaf.grad)
    assert not cache_sink[[1, 3, 4]].any() and not key_sink.any()
    sh_width = width - 4
    given = {"joined": [(4, sh_width)], "members": [(4, 3), (7, sh_width - 3)]}
    given["both"] = [(4, 3), (4, sh_width)]
    assert packed_from == [[], sorted(given[weighted])]


def test_joined_span_needs_consecutive_columns_of_one_channel_count():
    from clm.model.spec import AttributeSpec, gaussian_splatting_spec, joined_span, row_layout

    layout, _ = row_layout(gaussian_splatting_spec(3).host)  # quats, sh0, shN
    assert joined_span(layout, ("sh0", "shN"), 2) == (4, 27, (9, 3))
    assert joined_span(layout, ("quats", "sh0"), 3) is None  # shapes (4,) and (1, 3)
    assert joined_span(layout, ("sh0", "missing"), 3) is None
    rest = AttributeSpec("rest", (3, 3), 1.0, sh_rest=True)
    gap, _ = row_layout([rest, AttributeSpec("dc", (1, 3), 1.0)])
    assert joined_span(gap, ("rest", "dc"), 3) == (0, 12, (4, 3))
    assert joined_span(gap, ("rest", "dc"), 0) is None  # inactive bands sit between them


def lazily_stepped_rows(n: int, steps: int, pinned: bool = False, chunk_shift: int = 4):
    """Host rows of the 3DGS host attributes stepped by lazy Adam through ``steps`` steps (a
    random quarter of the rows has a gradient each step), and the same rows stepped by torch's
    dense Adam, every row every step (``{name: tensor}``)."""
    from clm.model.spec import gaussian_splatting_spec, unpack_rows
    from clm.offload.lazy_rows import HostRows
    from clm.optim.lazy_adam import AdamConfig
    from clm.optim.learning_rates import LearningRates

    spec = gaussian_splatting_spec(3)
    lrs = LearningRates(spec, 10, extent=1.0, batch_size=1)
    config = AdamConfig((0.9, 0.999), 1e-15)
    host = HostRows(spec.host, lrs, config, pinned=pinned, chunk_shift=chunk_shift, threads=2)
    g = torch.Generator().manual_seed(3)
    start = torch.randn(n, host.width, generator=g)
    host.append(unpack_rows(start, host.layout), step=0)
    ref = {s.attr.name: start[:, s.start : s.end].clone().requires_grad_() for s in host.layout}
    optim = torch.optim.Adam(
        [{"params": [t], "lr": lrs.at(name, 1)} for name, t in ref.items()],
        betas=config.betas,
        eps=config.eps,
    )
    for step in range(1, steps + 1):
        seen = torch.sort(torch.randperm(n, generator=g)[: n // 4]).values
        grads = torch.randn(seen.numel(), host.width, generator=g)
        host.step_rows(seen, grads, host.width, step)
        full = torch.zeros(n, host.width)
        full[seen] = grads
        for s in host.layout:
            ref[s.attr.name].grad = full[:, s.start : s.end].clone()
        optim.step()
    return host, spec, lrs, config, {name: t.detach() for name, t in ref.items()}


def test_gather_catches_rows_up_as_dense_adam_moves_them_and_leaves_the_host_rows():
    from clm.offload.catch_up import SkipSums

    host, spec, lrs, config, ref = lazily_stepped_rows(64, steps=6)
    store = host.store
    before = (*dense(store), torch.cat(store.last_chunks)[:64].clone())
    stale = int((before[3] < 6).sum())
    assert 0 < stale < 64
    skips = SkipSums(spec.host, lrs, config, torch.device("cpu"))
    gather = RowGather(store, torch.device("cpu"))
    rows, slots = torch.randperm(64), torch.arange(64)
    out = torch.zeros(64, host.width)
    gather.gather(rows, slots, host.width, out, catch_up=skips.to(6))
    got = torch.empty_like(out)
    got[rows] = out
    for s in host.layout:  # the closed form drops eps in skipped steps: ~1e-7 relative
        torch.testing.assert_close(got[:, s.start : s.end], ref[s.attr.name], rtol=1e-5, atol=1e-6)
    after = (*dense(store), torch.cat(store.last_chunks)[:64])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert gather.values_caught_up == stale * host.width
    # What the render saw is, bit for bit, where the CPU Adam's own catch-up puts the rows.
    host.catch_up(None, 6)
    assert torch.equal(dense(store)[0][:64], got)
