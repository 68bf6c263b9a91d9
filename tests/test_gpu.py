"""GPU tests (``pytest -m gpu`` on a CUDA machine): the fast paths against their CPU twins."""

import json
import math

import numpy as np
import pytest
import torch
from test_offload_parts import lazily_stepped_rows

from clm.engine.offloaded import OffloadEngine
from clm.engine.resident import ResidentEngine
from clm.methods.base import photometric_loss
from clm.model.spec import gaussian_splatting_spec
from clm.offload.catch_up import SkipSums
from clm.offload.culling import Culler, cull_bits_torch, pack_cameras
from clm.offload.gather import RowGather
from clm.offload.host_store import HostStore
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates, adam_betas
from clm.render.base import View
from clm.render.reach import reached_gsplat, reached_torch
from clm.render.splats import render_gsplat, render_torch
from clm.train.batch_loss import batch_loss

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def random_params(n: int, seed: int, spread=(4.0, 1.0, 4.0), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    params = {
        "means": (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor(spread),
        "scales": torch.log(torch.rand(n, 3, generator=g) * 0.08 + 0.02),
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g) * 1.5,
        "sh0": torch.randn(n, 1, 3, generator=g) * 0.5,
        "shN": torch.randn(n, 15, 3, generator=g) * 0.1,
    }
    return {k: v.to(device) for k, v in params.items()}


def ring_views(count: int, width: int, height: int, radius: float = 0.3, device="cpu"):
    views = []
    for i in range(count):
        a = 2 * math.pi * i / count
        fwd = torch.tensor([math.cos(a), 0.1, math.sin(a)])
        fwd = fwd / fwd.norm()
        right = torch.tensor([-math.sin(a), 0.0, math.cos(a)])
        down = torch.linalg.cross(fwd, right)
        rot = torch.stack([right, down, fwd])
        vm = torch.eye(4)
        vm[:3, :3] = rot
        vm[:3, 3] = -rot @ (-radius * fwd)
        f = 0.8 * width
        K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
        views.append(View(vm.to(device), K.to(device), width, height))
    return views


def test_gsplat_and_torch_rasterizer_agree():
    params = random_params(3000, seed=0)
    view = ring_views(5, 160, 120)[2]
    bg = torch.tensor([0.2, 0.1, 0.3])
    cpu = {k: v.clone().requires_grad_() for k, v in params.items()}
    gpu = {k: v.to(CUDA).requires_grad_() for k, v in params.items()}
    ours = render_torch(cpu, view, 3, bg)
    theirs = render_gsplat(gpu, view.to(CUDA), 3, bg.to(CUDA))
    assert ours.image.mean() > 0.05
    # Tolerance: gsplat uses __expf and fused float32 arithmetic, so a pixel whose
    # transmittance lands right at the 1e-4 cut-off may keep or drop one more Gaussian.
    diff = (ours.image - theirs.image.cpu()).abs().flatten()
    assert diff.mean() < 1e-4, float(diff.mean())
    assert torch.quantile(diff, 0.999) < 2e-3, float(torch.quantile(diff, 0.999))
    assert diff.max() < 2e-2, float(diff.max())
    ours_ids, their_ids = set(ours.ids.tolist()), set(theirs.ids.cpu().tolist())
    assert len(ours_ids ^ their_ids) <= 0.005 * len(their_ids)  # radius rounding at the border
    weights = torch.rand(ours.image.shape, generator=torch.Generator().manual_seed(1))
    (ours.image * weights).sum().backward()
    (theirs.image * weights.to(CUDA)).sum().backward()
    for name in ("means", "scales", "opacities", "sh0", "shN", "quats"):
        a, b = cpu[name].grad, gpu[name].grad.cpu()
        rel = (a - b).norm() / b.norm().clamp_min(1e-12)
        assert rel < 5e-2, (name, float(rel))


@pytest.mark.parametrize("seed", [0, 1])
def test_reach_kernel_finds_every_row_gsplat_reads(seed):
    """gsplat rendering the rows ``reached_gsplat`` reads, alone, in the walk's order or in
    another, gives the whole render's image bit for bit and its gradients (up to the order of
    its atomics), and no row outside them has a gradient; the kernel's set is the torch twin's
    up to rounding at the cut-offs, and leaves out much of what the render draws."""
    params = random_params(40_000, seed=seed, spread=(3.0, 1.0, 3.0))
    params["scales"] += math.log(0.4)  # about a quarter of the drawn rows are read
    params["means"][20_000:] = params["means"][:20_000]  # depth ties
    view = ring_views(5, 160, 120, device=CUDA)[seed]
    bg = torch.tensor([0.2, 0.1, 0.3], device=CUDA)
    gpu = {k: v.to(CUDA) for k, v in params.items()}
    reach = reached_gsplat(gpu, view)
    twin = reached_torch(params, view.to("cpu")).read.to(CUDA)
    drawn = render_gsplat(gpu, view, 3, bg).ids
    assert torch.equal(torch.nonzero(reach.drawn).squeeze(1), drawn.sort().values)
    assert 0.1 * drawn.numel() < int(reach.read.sum()) < 0.5 * drawn.numel()
    assert int((reach.read ^ twin).sum()) <= 0.01 * int(twin.sum())
    order = torch.randperm(40_000, generator=torch.Generator().manual_seed(seed)).to(CUDA)
    for rows in (torch.arange(40_000, device=CUDA), order):
        inputs = {k: v[rows] for k, v in gpu.items()}
        read = torch.nonzero(reach.read[rows]).squeeze(1)
        results = []
        for given in (inputs, {k: v[read] for k, v in inputs.items()}):
            leaves = {k: v.clone().requires_grad_() for k, v in given.items()}
            out = render_gsplat(leaves, view, 3, bg)
            weights = torch.linspace(-1.0, 1.0, out.image.numel(), device=CUDA)
            (out.image.flatten() * weights).sum().backward()
            results.append((out.image.detach(), {k: v.grad for k, v in leaves.items()}))
        (image, grads), (part, part_grads) = results
        assert torch.equal(part, image)
        outside = torch.ones(40_000, dtype=torch.bool, device=CUDA)
        outside[read] = False
        for name, grad in grads.items():  # gsplat sums per-pixel terms with atomics
            scale = float(grad.abs().max())
            torch.testing.assert_close(
                part_grads[name], grad[read], rtol=1e-4, atol=1e-5 * scale, msg=name
            )
            assert not grad[outside].any(), name


def test_cull_kernel_matches_torch_twin_and_is_conservative():
    from gsplat import fully_fused_projection

    params = random_params(200_000, seed=3, spread=(8.0, 3.0, 8.0), device=CUDA)
    views = ring_views(12, 320, 240, device=CUDA)
    culler = Culler(CUDA, chunk=1 << 16)  # several chunks
    assert culler.use_kernel
    result = culler.cull(params["means"], params["scales"], params["opacities"], views)
    cams = pack_cameras(views)
    twin = cull_bits_torch(params["means"], params["scales"], params["opacities"], cams)
    ids_twin = torch.nonzero(twin).squeeze(1)
    assert torch.equal(result.ids, ids_twin)
    assert torch.equal(
        result.vis, (twin[ids_twin][None] >> torch.arange(12, device=CUDA)[:, None]) & 1 == 1
    )
    # The engine passes column views of its packed key rows: the same result, no copies.
    packed = torch.cat([params["means"], params["opacities"][:, None], params["scales"]], dim=1)
    strided = culler.cull(packed[:, :3], packed[:, 4:7], packed[:, 3], views)
    assert torch.equal(strided.ids, result.ids) and torch.equal(strided.vis, result.vis)
    # Every Gaussian gsplat projects with a non-zero radius must survive culling.
    radii, *_ = fully_fused_projection(
        params["means"],
        None,
        torch.nn.functional.normalize(params["quats"], dim=-1),
        torch.exp(params["scales"]),
        torch.stack([v.viewmat for v in views]),
        torch.stack([v.K for v in views]),
        320,
        240,
        packed=False,
        opacities=torch.sigmoid(params["opacities"]),
    )
    drawn = (radii > 0).any(-1)  # [C, N]
    for c in range(len(views)):
        want = torch.nonzero(drawn[c]).squeeze(1)
        got = result.ids[result.vis[c]]
        assert torch.isin(want, got).all(), f"camera {c} lost Gaussians gsplat draws"
        assert got.numel() < 1.6 * want.numel() + 100  # and culling still culls
    # A view moved in place is packed again, not served stale from the camera cache.
    views[0].viewmat[:3, 3] += torch.tensor([2.0, 0.0, 0.0], device=CUDA)
    moved = culler.cull(params["means"], params["scales"], params["opacities"], views)
    fresh = Culler(CUDA).cull(params["means"], params["scales"], params["opacities"], views)
    assert torch.equal(moved.ids, fresh.ids) and torch.equal(moved.vis, fresh.vis)
    assert not torch.equal(moved.ids, result.ids)


@pytest.mark.parametrize("blocks", [None, 1])
def test_gather_kernel_matches_twin_across_chunks(blocks):
    """``blocks=1``: a one-block grid, so each thread strides over many groups of pieces."""
    store = HostStore(48, chunk_shift=10, pinned=True)
    rows_host = torch.randn(5000, 48)
    store.append(rows_host, step=0)
    gather = RowGather(store, CUDA)
    assert gather.use_kernel
    gather.max_blocks = blocks or gather.max_blocks
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(5000, generator=g)[:1500].to(CUDA)
    slots = torch.randperm(2000, generator=g)[:1500].to(CUDA)
    for width in (3, 12, 27, 48):
        out = torch.full((2000, 48), -7.0, device=CUDA)
        grad = torch.ones(2000, 48, device=CUDA)
        gather.gather(rows, slots, width, out, grad)
        torch.cuda.synchronize()
        assert torch.equal(out[slots, :width].cpu(), rows_host[rows.cpu(), :width])
        untouched = torch.ones(2000, dtype=torch.bool)
        untouched[slots.cpu()] = False
        assert (out[untouched.to(CUDA)] == -7.0).all()
        assert (out[slots, width:] == -7.0).all()
        assert (grad[slots, :width] == 0).all() and (grad[untouched.to(CUDA)] == 1).all()


@pytest.mark.parametrize("blocks", [None, 1])
def test_gather_kernel_catches_rows_up_as_the_cpu_adam_does(blocks):
    """Rows with skipped steps pending, gathered by the kernel: bit for bit the twin's values
    and the CPU Adam's own catch-up, across chunks and at every active width (``blocks=1``: a
    one-block grid, each thread striding)."""
    host, spec, lrs, config, _ = lazily_stepped_rows(3000, steps=5, pinned=True, chunk_shift=10)
    store = host.store
    kernel = RowGather(store, CUDA)
    kernel.max_blocks = blocks or kernel.max_blocks
    twin = RowGather(store, torch.device("cpu"))
    assert kernel.use_kernel and not twin.use_kernel
    g = torch.Generator().manual_seed(1)
    rows = torch.randperm(3000, generator=g)[:2000]
    slots = torch.randperm(2500, generator=g)[:2000]
    last = torch.cat(store.last_chunks)[rows]
    catch_up = SkipSums(spec.host, lrs, config, CUDA).to(5)
    twin_catch_up = SkipSums(spec.host, lrs, config, torch.device("cpu")).to(5)
    for width in (7, 16, 31, host.width):
        out = torch.full((2500, host.width), -7.0, device=CUDA)
        grad = torch.ones(2500, host.width, device=CUDA)
        kernel.gather(rows.to(CUDA), slots.to(CUDA), width, out, grad, catch_up=catch_up)
        want = torch.full((2500, host.width), -7.0)
        twin.gather(rows, slots, width, want, catch_up=twin_catch_up)
        assert torch.equal(out.cpu(), want)
        assert (grad[slots.to(CUDA), :width] == 0).all()
    assert kernel.values_caught_up == (7 + 16 + 31 + host.width) * int((last < 5).sum()) > 0
    before = torch.cat(store.param_chunks)[rows].clone()
    host.catch_up(rows, 5)
    caught = torch.cat(store.param_chunks)[rows]
    assert torch.equal(out[slots.to(CUDA)].cpu(), caught)
    assert not torch.equal(before, caught)


def _train(engine, views, targets, batches, degrees, method=None):
    """``method``: train with its batch loss (a local one trains pieces in one pass), else
    with the 3DGS loss written out here."""
    bg = torch.zeros(3, device=CUDA)
    for batch, degree in zip(batches, degrees, strict=True):

        def loss_fn(i, out, batch=batch):
            return photometric_loss(out.image, targets[batch[i]]) / len(batch)

        if method is not None:
            chosen = [views[i] for i in batch]
            loss_fn = batch_loss(method, [targets[i] for i in batch], chosen, 1)

        engine.train_step([views[i] for i in batch], loss_fn, lambda *a: None, degree, bg)
    return engine.snapshot()


def assert_same_training(got, ref) -> None:
    """gsplat's backward accumulates with atomics, so runs differ in the last bits, and Adam
    turns a near-zero gradient's sign into a learning-rate-sized step (seen on up to 0.11% of the
    opacities, whose rate is the largest): allow a handful of such elements. A stale row or a
    lost gradient would spoil whole rows of every attribute."""
    for name in ref.params:
        for a, b in ((got.params[name], ref.params[name]), (got.exp_avg[name], ref.exp_avg[name])):
            close = torch.isclose(a, b, rtol=1e-3, atol=1e-5)
            assert close.float().mean() > 0.995, (name, float(close.float().mean()))
            assert (a - b).abs().max() <= 0.05 * b.abs().max() + 1e-5, name


@pytest.mark.parametrize(
    ("cache_rows", "resident", "walk"),
    [(None, 0, True), (9000, 0, True), (9000, 8000, True), (None, 10**6, True), (None, 0, False)],
)
def test_stream_ordering_under_stress(cache_rows, resident, walk):
    """Many small micro-batches through a cache that must reuse slots (and, when small, split
    batches), with some, none or all rows resident: the CUDA pipeline gives what the
    GPU-resident engine gives. With the walk, the flush copies gradient rows whole; without,
    it packs out the many rows without gradient (GradientFlush)."""
    spec = gaussian_splatting_spec(3)
    params = random_params(20_000, seed=5)
    views = ring_views(32, 96, 72, device=CUDA)
    g = torch.Generator().manual_seed(2)
    targets = [torch.rand(72, 96, 3, generator=g).to(CUDA) for _ in views]
    batches = [list(range(i, 32, 2)) for i in (0, 1)] * 2 + [list(range(32))]
    degrees = [0, 1, 2, 3, 3]
    batch = 16

    def common():
        return {
            "spec": spec,
            "render_fn": render_gsplat,
            "lrs": LearningRates(spec, 10, extent=3.0, batch_size=batch),
            "adam": AdamConfig(betas=adam_betas(batch)),
            "device": CUDA,
        }

    ref = _train(ResidentEngine(params, **common()), views, targets, batches, degrees)
    engine = OffloadEngine(
        params,
        cache_rows=cache_rows,
        staging_rows=4096,
        chunk_shift=12,
        resident=resident,
        views=views,
        leave_unread=None if walk else False,
        **common(),
    )
    got = _train(engine, views, targets, batches, degrees)
    engine.close()
    assert_same_training(got, ref)
    assert engine.resident.count == min(resident, 20_000)
    stats = engine.last_stats
    assert (stats.host_rows < stats.visible_rows) == (resident > 0)
    # rows no pixel reads were left out (on CUDA by default)
    assert (engine.reach is not None) == walk
    assert stats.read_rows <= stats.host_rows
    if resident == 0 and walk:
        assert 0 < stats.read_rows < stats.host_rows
    flush = engine.flusher
    if cache_rows is None and resident == 0:  # a batch is one stretch: nothing is deferred
        if walk:  # copied whole: every flushed row crossed; the CPU Adam skipped any zero rows
            assert 0 < flush.rows_stepped <= flush.rows_sent == flush.rows_flushed
        else:  # packed: the rows without gradient stayed on the GPU
            assert 0 < flush.rows_stepped == flush.rows_sent < flush.rows_flushed


def test_short_training_run(tmp_path):
    from clm.cli.train import main as train_main
    from clm.synthetic.generate import generate_scene

    scene = generate_scene(tmp_path / "scene", "tiny", device="cuda", progress=False)
    out = tmp_path / "run"
    code = train_main(
        [
            str(scene),
            "--output",
            str(out),
            "--preset",
            "tiny",
            "--steps",
            "600",
            "--max-gpu-gb",
            "4",
            "--no-progress",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["psnr"] > 20.0, metrics["psnr"]
    assert (out / "point_cloud.ply").stat().st_size > 1000
    assert np.isfinite(metrics["ssim"])
