"""Pick and size the engine for ``--offload`` and the memory budgets."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from clm.devices import with_index
from clm.engine.base import STREAM_ROWS, Engine, RowSource
from clm.engine.naive import NaiveEngine
from clm.engine.offloaded import OffloadEngine
from clm.engine.resident import ResidentEngine
from clm.errors import ClmError
from clm.model.spec import GaussianSpec
from clm.offload.budget import (
    BATCH_ROW_BYTES,
    DENSITY_STATS_BYTES,
    GIB,
    GpuPlan,
    apply_gpu_cap,
    busiest_view_share,
    plan_gpu,
)
from clm.offload.flush import staging_rows_for
from clm.offload.host_budget import HostPlan, plan_host
from clm.offload.resident_rows import ResidentBudget
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.render.base import RenderFn, View, reach_of

log = logging.getLogger("clm")


@dataclass(frozen=True)
class EngineOptions:
    """What choosing and sizing an engine depends on (the training options it reads)."""

    offload: str = "clm"
    batch_size: int = 1
    max_gpu_gb: float | None = None
    max_host_gb: float | None = None
    cpu_threads: int | None = None
    max_gaussians: int | None = None

    @classmethod
    def of(cls, config: Any) -> EngineOptions:
        """The options of a :class:`~clm.train.config.TrainConfig` (or anything with them)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def make_engine(
    cfg: EngineOptions,
    spec: GaussianSpec,
    rows: Mapping[str, Tensor] | RowSource,
    render_fn: RenderFn,
    lrs: LearningRates,
    adam: AdamConfig,
    device: torch.device,
    max_pixels: int,
    views: Sequence[View] = (),
    key: Sequence[str] | None = None,
) -> Engine:
    """The engine ``cfg.offload`` asks for, sized to the budgets, with the plans logged, holding
    ``rows`` (parameters, or a stream of chunks that is loaded without a second copy).

    Both budgets are checked before a row is loaded. ``views`` (the training views, optional)
    let the GPU planner size the row cache for this scene, from a sample of the rows. ``key``:
    the attributes to keep on the GPU, as a checkpoint of lazily updated rows recorded them;
    None: the spec's key attributes, and with ``--offload clm`` on CUDA those the renderer's
    walk reads where the budgets hold them for as many Gaussians (the engine's ``spec`` says
    which).
    """
    device = with_index(device)
    source = rows if isinstance(rows, RowSource) else RowSource.of(rows)
    num = source.count
    hard = device.type == "cuda" and cfg.max_gpu_gb is not None
    budget, share = 0, None
    if device.type == "cuda":
        if cfg.max_gpu_gb is not None:
            budget = apply_gpu_cap(device, cfg.max_gpu_gb)
        else:  # no hard cap asked for: plan for most of the card
            budget = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
        if cfg.offload == "clm" and views and source.sample is not None:
            share = busiest_view_share(spec, source.sample(), views)
            log.info("the busiest training view sees %.1f%% of the Gaussians", 100 * share)

    def plans(spec: GaussianSpec) -> _Plans:
        plan = None
        if device.type == "cuda":
            plan = plan_gpu(spec, cfg.offload, budget, max_pixels, share)
        staging_rows = staging_rows_for(plan.cache_rows if plan else None)
        host = plan_host(
            host_bytes_per_gaussian(spec, cfg.offload, device),
            host_buffers(spec, cfg, max_pixels, staging_rows),
            int(cfg.max_host_gb * GIB) if cfg.max_host_gb else None,
        )
        return _Plans(plan, host, staging_rows, cfg.max_gaussians)

    if key is not None:
        spec = spec.with_key(key)
        planned = plans(spec)
    else:
        spec, planned = _walk_on_gpu(spec, cfg, device, render_fn, plans)
    plan, host, staging_rows = planned.gpu, planned.host, planned.staging_rows
    log.info(host.describe())
    host.check(num)
    if plan is not None:
        log.info(plan.describe(cfg.offload))
        if num > plan.max_gaussians:
            raise ClmError(
                f"the scene starts with {num} Gaussians but {plan.budget / GIB:.1f} GiB of GPU "
                f"memory holds at most {plan.max_gaussians} with --offload {cfg.offload}"
            )
    empty = {a.name: torch.zeros(0, *a.shape) for a in spec}
    common = {"spec": spec, "render_fn": render_fn, "lrs": lrs, "adam": adam, "device": device}
    store_bytes = host.rows_bytes if host.capped else None
    if cfg.offload == "none":
        engine: Engine = ResidentEngine(empty, **common)
    elif cfg.offload == "naive":
        engine = NaiveEngine(
            empty, max_host_bytes=store_bytes, cpu_threads=cfg.cpu_threads, **common
        )
    else:
        resident_budget = 0
        if plan is not None:
            per_row = plan.per_gaussian + BATCH_ROW_BYTES
            resident_budget = ResidentBudget(budget, plan.workspace, per_row)
        # What the budget leaves beside the key rows, the cache and the render workspace holds
        # resident rows. The key table grows through host memory under a hard budget, so its
        # room for growth is not taken ahead from them.
        engine = OffloadEngine(
            empty,
            cache_rows=plan.cache_rows if plan else None,
            staging_rows=staging_rows,
            max_host_bytes=store_bytes,
            cpu_threads=cfg.cpu_threads,
            resident=resident_budget,
            views=views,
            grow_through_host=hard,
            **common,
        )
    max_gaussians = planned.limit
    engine.max_gaussians = max_gaussians
    # The other engines take a hard GPU budget before loading, so neither loading nor growth
    # ever reallocates (a copy would briefly need old and new memory, past the budget).
    ahead = hard and cfg.offload != "clm"
    engine.reserve(max(max_gaussians, num) if ahead else num)
    engine.load_rows(source)
    return engine


@dataclass(frozen=True)
class _Plans:
    """The GPU plan (None off CUDA), the host plan and the staging ring for one spec."""

    gpu: GpuPlan | None
    host: HostPlan
    staging_rows: int
    max_gaussians: int | None  # --max-gaussians

    @property
    def limit(self) -> int:
        """The most Gaussians the run may grow to under these plans."""
        most = self.host.max_gaussians
        if self.gpu is not None:
            most = min(most, self.gpu.max_gaussians)
        return most if self.max_gaussians is None else min(most, self.max_gaussians)


def _walk_on_gpu(
    spec: GaussianSpec,
    cfg: EngineOptions,
    device: torch.device,
    render_fn: RenderFn,
    plans: Callable[[GaussianSpec], _Plans],
) -> tuple[GaussianSpec, _Plans]:
    """``spec`` with the host attributes the renderer's walk reads (the rotations, for 3DGS)
    made key, where the budgets hold them for as many Gaussians as without; else ``spec``.

    Each step, ``--offload clm`` walks every culled-in row's footprint to find the rows a
    view reads (:mod:`clm.offload.read_rows`). Read from host rows, those attributes cross
    PCIe for every host row a batch culls in, a few bytes from each scattered row: at 40M
    Gaussians under 24 GiB, a third of the step. On the GPU they cost 12 bytes per float per
    Gaussian (the value and its two Adam moments), taken from the resident rows.
    """
    planned = plans(spec)
    reach = reach_of(render_fn)
    if cfg.offload != "clm" or device.type != "cuda" or reach is None:
        return spec, planned
    key = {a.name for a in spec.key}
    walked = [name for name in reach.reads if name not in key and name in spec.names]
    if not walked:
        return spec, planned
    promoted = spec.with_key(walked)
    on_gpu = plans(promoted)
    names = ", ".join(walked)
    if on_gpu.limit < planned.limit:
        log.info(
            "%s (read to find the rows each view reads) stay in host rows: on the GPU they "
            "would lower the most Gaussians from %.2fM to %.2fM (--max-gaussians %d keeps "
            "them there)",
            names,
            planned.limit / 1e6,
            on_gpu.limit / 1e6,
            on_gpu.limit,
        )
        return spec, planned
    log.info("%s (read to find the rows each view reads) stay on the GPU", names)
    return promoted, on_gpu


def host_bytes_per_gaussian(spec: GaussianSpec, offload: str, device: torch.device) -> int:
    """Host bytes each Gaussian costs: its offloaded row with both moments and a step counter,
    or, with the compute device on the CPU, everything the engine keeps there."""
    width = sum(a.width for a in spec)
    key_width = sum(a.width for a in spec.key)
    on_cpu = device.type == "cpu"
    if offload == "none":
        return 16 * width + DENSITY_STATS_BYTES if on_cpu else 0
    if offload == "naive":
        return 16 * width + 4
    store = 12 * (width - key_width) + 4
    return store + (16 * key_width + DENSITY_STATS_BYTES if on_cpu else 0)


def host_buffers(spec: GaussianSpec, cfg: EngineOptions, max_pixels: int, staging_rows: int) -> int:
    """Host memory training needs whatever the model's size: the pinned gradient staging ring
    of ``staging_rows``, staged and prefetched target images, and the blocks a checkpoint or
    PLY streams through."""
    width = sum(a.width for a in spec)
    staging = staging_rows * (4 * width + 16) if cfg.offload == "clm" else 0
    images = 4 * cfg.batch_size * max_pixels * 3
    streaming = 2 * STREAM_ROWS * 12 * width
    return staging + images + streaming
