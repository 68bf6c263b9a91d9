"""The three engines compute the same optimisation: after several steps from one seed, offload
modes hold the same parameters and Adam moments as the GPU-resident reference."""

import math
import threading

import pytest
import torch

from clm.engine.naive import NaiveEngine
from clm.engine.offloaded import OffloadEngine
from clm.engine.resident import ResidentEngine
from clm.methods.base import photometric_loss
from clm.model.spec import gaussian_splatting_spec
from clm.model.table import Compaction
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates, adam_betas
from clm.render.base import ReachFinder, View, reach_of
from clm.render.reach import REACH_TORCH
from clm.render.splats import render_torch

W, H = 24, 18


def make_params(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([4.0, 1.0, 4.0]),
        "scales": torch.log(torch.rand(n, 3, generator=g) * 0.1 + 0.05),
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g) * 0.5,
        "shN": torch.randn(n, 15, 3, generator=g) * 0.05,
    }


def ring_views(count: int) -> list[View]:
    """Cameras on a circle looking outwards: each sees a different part of the points."""
    views = []
    for i in range(count):
        a = 2 * math.pi * i / count
        fwd = torch.tensor([math.cos(a), 0.0, math.sin(a)])
        right = torch.tensor([-math.sin(a), 0.0, math.cos(a)])
        down = torch.tensor([0.0, 1.0, 0.0])
        rot = torch.stack([right, down, fwd])
        vm = torch.eye(4)
        vm[:3, :3] = rot
        vm[:3, 3] = -rot @ (-0.3 * fwd)
        K = torch.tensor([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1]])
        views.append(View(vm, K, W, H))
    return views


def render_every_row(params, view, sh_degree, background):
    """render_torch without its declared reach: the engine renders every culled-in row."""
    return render_torch(params, view, sh_degree, background)


def make_engine(kind: str, params, batch: int, steps: int, **extra):
    """``extra``: the engine's options, with ``key``: attributes made key in the 3DGS spec."""
    spec = gaussian_splatting_spec(3).with_key(extra.pop("key", ()))
    common = {
        "spec": spec,
        "render_fn": extra.pop("render_fn", render_torch),
        "lrs": LearningRates(spec, steps, extent=2.0, batch_size=batch),
        "adam": AdamConfig(betas=adam_betas(batch)),
        "device": torch.device("cpu"),
    }
    if kind == "none":
        return ResidentEngine(params, **common)
    if kind == "naive":
        return NaiveEngine(params, chunk_shift=6, **common)
    extra.setdefault("leave_unread", True)  # (on the CPU too: the path CUDA takes)
    return OffloadEngine(params, chunk_shift=6, **common, **extra)


class Observed:
    """What ``observe`` is given, per step and view: the rows rendered and their screen-space
    gradient norms, by row (densification's statistics)."""

    def __init__(self) -> None:
        self.steps: list[dict[int, float]] = []

    def __call__(self, ids, out, view) -> None:
        g = out.means2d.grad
        norms = torch.hypot(g[:, 0] * view.width, g[:, 1] * view.height)
        seen = self.steps[-1]
        for i, x in zip(ids.tolist(), norms.tolist(), strict=True):
            seen[i] = seen.get(i, 0.0) + x

    def assert_same(self, other: "Observed") -> None:
        assert len(self.steps) == len(other.steps)
        for mine, theirs in zip(self.steps, other.steps, strict=True):
            assert mine.keys() == theirs.keys()
            rows = sorted(mine)
            a = torch.tensor([mine[i] for i in rows], dtype=torch.float64)
            b = torch.tensor([theirs[i] for i in rows], dtype=torch.float64)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9)


def train(
    engine,
    views,
    targets,
    batches,
    sh_degrees,
    densify_at=None,
    observe=None,
    loss_of=None,
):
    """``observe``: an :class:`Observed` to record the density statistics in; ``loss_of(targets,
    views, step)``: the batch's loss function (else the 3DGS loss, written out here)."""
    bg = torch.zeros(3)
    for step, (batch, degree) in enumerate(zip(batches, sh_degrees, strict=True), start=1):
        chosen = [views[i] for i in batch]

        def loss_fn(i, out, batch=batch):
            return photometric_loss(out.image, targets[batch[i]]) / len(batch)

        if loss_of is not None:
            loss_fn = loss_of([targets[i] for i in batch], chosen, step)
        if observe is not None:
            observe.steps.append({})
        sink = observe if observe is not None else (lambda ids, out, view: None)
        engine.train_step(chosen, loss_fn, sink, degree, bg)
        if densify_at == step:
            n = engine.num_gaussians
            src = torch.arange(0, n, 7)
            means = engine.key_param("means")[src] + 0.01
            engine.append(src, {"means": means})
            keep = torch.ones(engine.num_gaussians, dtype=torch.bool)
            keep[torch.arange(3, engine.num_gaussians, 11)] = False
            engine.compact(Compaction.from_keep(keep))
            engine.reset_opacity(-2.0)
    return engine.snapshot()


@pytest.fixture(scope="module")
def setup():
    views = ring_views(6)
    g = torch.Generator().manual_seed(1)
    targets = [torch.rand(H, W, 3, generator=g) for _ in views]
    batches = [[0, 1, 2], [3, 4, 5], [1, 2, 3], [5, 0, 4], [2, 5, 1], [0, 3, 4]]
    degrees = [0, 0, 1, 1, 2, 3]
    return views, targets, batches, degrees


def assert_same(a, b, rtol=2e-4, atol=2e-6):
    assert a.step == b.step
    for name in a.params:
        torch.testing.assert_close(a.params[name], b.params[name], rtol=rtol, atol=atol)
        torch.testing.assert_close(a.exp_avg[name], b.exp_avg[name], rtol=rtol, atol=atol)
        torch.testing.assert_close(a.exp_avg_sq[name], b.exp_avg_sq[name], rtol=rtol, atol=1e-12)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("naive", {}),
        ("clm", {"cache_rows": None}),
        ("clm", {"cache_rows": 200, "staging_rows": 64}),  # forces stretches and deferred rows
        # every culled-in row rendered, those without gradient skipped
        ("clm", {"cache_rows": 200, "staging_rows": 64, "render_fn": render_every_row}),
        ("clm", {"cache_rows": None, "resident": 150}),  # the most seen rows on the "GPU"
        ("clm", {"cache_rows": 150, "staging_rows": 64, "resident": 100}),  # and stretches
        ("clm", {"cache_rows": None, "resident": 10**6}),  # every row: the cache goes unused
        # a hard budget: growth sends the resident rows back to the host, then chooses again
        ("clm", {"cache_rows": None, "resident": 150, "grow_through_host": True}),
        # the rotations the walk reads kept on the "GPU" with the key attributes
        ("clm", {"cache_rows": 200, "staging_rows": 64, "key": ["quats"]}),
        ("clm", {"cache_rows": 150, "staging_rows": 64, "resident": 100, "key": ["quats"]}),
    ],
)
def test_offload_modes_match_gpu_resident(setup, kind, extra):
    views, targets, batches, degrees = setup
    params = make_params(400)
    want, seen = Observed(), Observed()
    ref = make_engine("none", params, 3, 6)
    ref = train(ref, views, targets, batches, degrees, densify_at=3, observe=want)
    if "resident" in extra:
        extra = {**extra, "views": views}
    engine = make_engine(kind, params, 3, 6, **extra)
    got = train(engine, views, targets, batches, degrees, densify_at=3, observe=seen)
    stats = engine.last_stats
    engine.close()
    if getattr(engine, "reach", None) is not None:  # walks read host columns unless all is key
        assert (not engine._reach_segments) == ("key" in extra)
    assert ref.params["means"].shape[0] != 400  # densification ran
    assert ref.exp_avg["shN"].abs().max() > 0  # higher SH bands were trained
    assert_same(got, ref)
    seen.assert_same(want)
    if kind == "clm" and extra.get("resident", 0) < 400:  # some rows took the host path
        # The result is still dense Adam's, with rows no pixel composites left out of the
        # renders, or rendered and their zero gradients not stepped.
        if reach_of(engine.render_fn) is not None:
            assert 0 < stats.read_rows < stats.host_rows
        else:
            assert 0 < engine.flusher.rows_stepped < engine.flusher.rows_flushed
    if "resident" in extra:  # the last batch took rows from both sets (or all from one)
        resident = min(extra["resident"], engine.num_gaussians)
        assert engine.resident.count == resident
        assert stats.host_rows < stats.visible_rows
        assert (stats.host_rows == 0) == (resident == engine.num_gaussians)


def test_tight_cache_splits_batches(setup):
    views, targets, batches, degrees = setup
    engine = make_engine("clm", make_params(400), 3, 6, cache_rows=200, staging_rows=64)
    train(engine, views, targets, batches[:1], degrees[:1])
    assert engine.last_stats.visible_rows > 200  # the union did not fit the cache
    engine.close()


def test_staging_ring_holds_what_the_host_path_can_send(setup, monkeypatch):
    """The ring holds up to ``staging_rows``, but no more than the host rows left beside the
    resident ones (with the smallest ring lowered so that the bound shows at this size)."""
    import clm.engine.offloaded as offloaded

    monkeypatch.setattr(offloaded, "STAGING_ROWS", 16)
    views, targets, batches, degrees = setup
    for resident, ring in ((350, 50), (390, 16), (0, 300)):
        engine = make_engine(
            "clm", make_params(400), 3, 6, cache_rows=200, staging_rows=300, resident=resident
        )
        train(engine, views, targets, batches[:1], degrees[:1])
        assert engine.flusher.staging.capacity == ring
        engine.close()


@pytest.mark.parametrize("room", [150, 10**6])
def test_resident_rows_take_what_the_first_steps_leave(setup, room):
    """A planned budget that leaves no room for resident rows is measured against the first
    steps (readings standing in for the CUDA allocator's). The rows the measured room holds are
    resident from the step after, and training is still the resident engine's. Room for every
    row leaves the plan's: with every row resident a view renders whole, which nothing
    measured bounds."""
    from clm.offload.resident_rows import ResidentBudget
    from clm.offload.step_memory import MEASURED_STEPS, StepMemory

    views, targets, batches, degrees = setup
    params = make_params(400)
    ref = train(make_engine("none", params, 3, 6), views, targets, batches, degrees, densify_at=3)
    # bytes held before the first step and after the last measured one, and a step's most
    before, held, most = 1000, 4000, 800
    row = 16 * 52  # a resident row of 52 floats: parameter, two moments, gradient
    adam = 2**21 * 52 * 4  # the dense Adam's temporary: 2M rows of 52 floats
    budget = math.ceil((held + 1.25 * most + adam + room * row + 100) / 0.95)
    planned = ResidentBudget(budget, workspace=budget, per_gaussian=0)  # no room planned
    engine = make_engine(
        "clm", params, 3, 6, cache_rows=200, staging_rows=64, resident=planned, views=views
    )
    readings = iter([(before, before), (held, before + most)])
    engine.step_memory = StepMemory(torch.device("cpu"), read=lambda device: next(readings))
    counts = []
    step = engine.train_step

    def counted(*args):
        step(*args)
        counts.append(engine.resident.count)

    engine.train_step = counted
    got = train(engine, views, targets, batches, degrees, densify_at=3)
    engine.close()
    assert_same(got, ref)
    after = room if room < engine.num_gaussians else 0
    assert counts == [0] * MEASURED_STEPS + [after] * (len(batches) - MEASURED_STEPS)


def test_a_run_with_every_row_resident_measures_nothing(setup):
    """With every row resident there are no host rows to give room to: no measurement, and no
    row cache allocated for it."""
    from clm.offload.resident_rows import ResidentBudget
    from clm.offload.step_memory import StepMemory

    views, targets, batches, degrees = setup
    planned = ResidentBudget(2**30, workspace=0, per_gaussian=0)  # room for every row
    engine = make_engine(
        "clm", make_params(400), 3, 6, cache_rows=200, resident=planned, views=views
    )
    readings = []
    engine.step_memory = StepMemory(torch.device("cpu"), read=lambda d: readings.append(d))
    train(engine, views, targets, batches[:2], degrees[:2])
    engine.close()
    assert engine.resident.count == 400 and engine.step_memory is None
    assert readings == [] and engine.cache_param.shape[0] == 0


class HeldCpuAdam:
    """Holds the CPU Adam of each batch behind a gate until the main thread waits for it
    (``settle``), and records which rows it is given (``given``, by step) and, between
    ``start(step)`` and ``stop()``, the gathers and waits of the main thread (``log``)."""

    def __init__(self, engine: OffloadEngine) -> None:
        self.gate = threading.Event()
        self.given: dict[int, list[torch.Tensor]] = {}
        self.log: list[tuple[int, str, torch.Tensor | None]] = []
        self._step: int | None = None
        worker = engine.flusher.worker
        real_mark, real_step_rows = worker.mark, engine.host.step_rows
        real_gather, real_settle = engine.gather.gather, engine._settle

        def mark():
            self.gate.clear()
            worker.submit(lambda: self.gate.wait(timeout=10))
            return real_mark()

        def step_rows(rows, grads, width, step, *rest):
            self.given.setdefault(step, []).append(rows.clone())
            return real_step_rows(rows, grads, width, step, *rest)

        def gather(rows, *args, **kwargs):
            if self._step is not None:
                self.log.append((self._step, "gather", rows.clone()))
            return real_gather(rows, *args, **kwargs)

        def settle(batch):
            if self._step is not None and not batch.settled.is_set():
                self.log.append((self._step, "wait", None))
            self.gate.set()
            real_settle(batch)

        worker.mark, engine.host.step_rows = mark, step_rows
        engine.gather.gather, engine._settle = gather, settle

    def start(self, step: int) -> None:
        self._step = step

    def stop(self) -> None:
        self._step = None

    def assert_split_around_the_wait(self, steps: range, first: str) -> None:
        """In each step, the ``first`` phase gathers rows the CPU Adam of the batch before is
        not given, waits for it once, then gathers rows it is given."""
        for step in steps:
            entries = [entry for entry in self.log if entry[0] == step]
            kinds = [kind for _, kind, _ in entries]
            assert kinds[:4] == [first, "gather", "wait", "gather"], kinds
            assert kinds.count("wait") == 1
            early, late = entries[1][2], entries[3][2]
            stepped = torch.cat(self.given[step - 1])
            assert early.numel() and late.numel()
            assert not torch.isin(early, stepped).any()
            assert torch.isin(late, stepped).all()


def test_the_walk_gathers_rows_the_cpu_adam_steps_only_once_it_is_done(setup):
    """While the CPU Adam of the batch before runs (held here by a gate until the main thread
    waits for it), the walk gathers only rows that Adam is not given; the others follow once
    it is done, and training is still the resident engine's."""
    views, targets, batches, degrees = setup
    params = make_params(400)
    ref = train(make_engine("none", params, 3, 6), views, targets, batches, degrees)
    engine = make_engine("clm", params, 3, 6, cache_rows=None)
    held = HeldCpuAdam(engine)
    real_walk = engine._walk

    def walk(*args):
        held.start(engine.step + 1)
        held.log.append((engine.step + 1, "walk", None))
        try:
            return real_walk(*args)
        finally:
            held.stop()

    engine._walk = walk
    got = train(engine, views, targets, batches, degrees)
    engine.close()
    held.assert_split_around_the_wait(range(2, len(batches) + 1), "walk")
    # only the walk was logged: nothing else gathered rows of a step that waited in the walk
    assert [k for _, k, _ in held.log].count("walk") == len(batches)
    assert_same(got, ref)


def test_the_first_load_gathers_rows_the_cpu_adam_steps_only_once_it_is_done(setup):
    """With the attributes the walk reads on the GPU the walk waits for nothing, and the step's
    first load is what waits for the CPU Adam of the batch before (held here by a gate until the
    main thread waits): it gathers the rows that Adam is not given while it runs and the others
    once it is done; the loads after it wait for nothing; training is the resident engine's."""
    views, targets, batches, degrees = setup
    params = make_params(400)
    ref = train(make_engine("none", params, 3, 6), views, targets, batches, degrees)
    engine = make_engine("clm", params, 3, 6, cache_rows=None, key=["quats"])
    assert not engine._reach_segments  # the walk gathers nothing
    held = HeldCpuAdam(engine)
    real_load, real_step = engine._load, engine.train_step

    def load(batch, *args):
        held.log.append((batch.step, "load", None))
        return real_load(batch, *args)

    def train_step(*args):
        held.start(engine.step + 1)
        try:
            return real_step(*args)
        finally:
            held.stop()

    engine._load, engine.train_step = load, train_step
    got = train(engine, views, targets, batches, degrees)
    engine.close()
    held.assert_split_around_the_wait(range(2, len(batches) + 1), "load")
    for step in range(2, len(batches) + 1):  # and the loads after the first wait for nothing
        assert [k for i, k, _ in held.log if i == step].count("load") > 1
    assert_same(got, ref)


@pytest.mark.parametrize("resident", [0, 150])
def test_evaluation_renders_the_rows_pixels_read(setup, resident):
    """A trained engine renders a view from the rows its pixels read: the image and alpha of
    every row, bit for bit, from fewer rows; a walk out of GPU memory renders every row."""
    views, targets, batches, degrees = setup
    params = make_params(400)
    params["opacities"] = params["opacities"] + 4.0  # opaque enough to hide rows
    extra = {"resident": resident, "views": views} if resident else {}
    engine = make_engine("clm", params, 3, 6, cache_rows=None, **extra)
    train(engine, views, targets, batches[:3], degrees[:3])
    bg = torch.zeros(3)
    finder = engine.reach

    def out_of_memory(params, view):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    for view in views:
        read = engine.render(view, 3, bg)
        engine.reach = None
        every = engine.render(view, 3, bg)
        engine.reach = ReachFinder(out_of_memory, finder.reads)
        refused = engine.render(view, 3, bg)
        engine.reach = finder
        assert torch.equal(read.image, every.image) and torch.equal(read.alpha, every.alpha)
        assert torch.equal(refused.image, every.image)
        assert 0 < read.ids.numel() < every.ids.numel() == refused.ids.numel()
        assert torch.isin(read.ids, every.ids).all()
    engine.close()


def test_rows_no_pixel_reads_are_left_out_on_cuda_only_by_default():
    """On the CPU the walk costs about what it saves; asked for, it runs there too."""
    params = make_params(50)
    by_default = make_engine("clm", params, 1, 1, cache_rows=None, leave_unread=None)
    asked = make_engine("clm", params, 1, 1, cache_rows=None)
    every_row = make_engine("clm", params, 1, 1, cache_rows=None, render_fn=render_every_row)
    assert by_default.reach is None and every_row.reach is None
    assert asked.reach is reach_of(render_torch) is not None
    for engine in (by_default, asked, every_row):
        engine.close()


def test_a_walk_out_of_gpu_memory_reads_every_row(setup):
    """When a view's walk does not fit the GPU budget, the batch renders every culled-in row:
    training is still the resident engine's, density statistics included."""
    views, targets, batches, degrees = setup
    calls = []

    def walk_that_runs_out(params, view):
        calls.append(1)
        if len(calls) in (2, 8):  # in the first batch and the third
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return REACH_TORCH.find(params, view)

    def render(params, view, sh_degree, background):
        return render_torch(params, view, sh_degree, background)

    render.reach = ReachFinder(walk_that_runs_out, REACH_TORCH.reads)
    params = make_params(400)
    want, seen = Observed(), Observed()
    ref = make_engine("none", params, 3, 6)
    ref = train(ref, views, targets, batches, degrees, densify_at=3, observe=want)
    engine = make_engine("clm", params, 3, 6, cache_rows=200, staging_rows=64, render_fn=render)
    got = train(engine, views, targets, batches, degrees, densify_at=3, observe=seen)
    engine.close()
    assert 0 < engine._walk_refused < len(batches)
    assert_same(got, ref)
    seen.assert_same(want)
