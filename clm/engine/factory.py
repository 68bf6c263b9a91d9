"""Pick and size the engine for ``--offload`` and the memory budgets."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from clm.engine.base import AdamSettings, Engine
from clm.engine.naive import NaiveEngine
from clm.engine.offloaded import OffloadEngine
from clm.engine.resident import ResidentEngine
from clm.errors import ClmError
from clm.model.spec import GaussianSpec
from clm.offload.budget import GIB, apply_gpu_cap, busiest_view_share, plan_gpu
from clm.render.base import RenderFn, View
from clm.train.config import TrainConfig
from clm.train.schedule import LearningRates

log = logging.getLogger("clm")


def make_engine(
    cfg: TrainConfig,
    spec: GaussianSpec,
    params: Mapping[str, Tensor],
    render_fn: RenderFn,
    lrs: LearningRates,
    adam: AdamSettings,
    device: torch.device,
    max_pixels: int,
    views: Sequence[View] = (),
) -> Engine:
    """The engine ``cfg.offload`` asks for, sized to the budgets, with the plan logged.

    ``views`` (the training views, optional) let the planner size the row cache for this scene.
    """
    if device.type == "cuda" and device.index is None:  # CUDA memory APIs want an index
        device = torch.device("cuda", torch.cuda.current_device())
    num = next(iter(params.values())).shape[0]
    common = {"spec": spec, "render_fn": render_fn, "lrs": lrs, "adam": adam, "device": device}
    host_bytes = int(cfg.max_host_gb * GIB) if cfg.max_host_gb else None
    plan = None
    if device.type == "cuda":
        if cfg.max_gpu_gb is not None:
            budget = apply_gpu_cap(device, cfg.max_gpu_gb)
        else:  # no hard cap asked for: plan for most of the card
            budget = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
        share = None
        if cfg.offload == "clm" and views:
            share = busiest_view_share(params, views)
            log.info("the busiest training view sees %.1f%% of the Gaussians", 100 * share)
        plan = plan_gpu(spec, cfg.offload, budget, max_pixels, share)
        log.info(plan.describe(cfg.offload))
        if num > plan.max_gaussians:
            raise ClmError(
                f"the scene starts with {num} Gaussians but {budget / GIB:.1f} GiB of GPU memory "
                f"holds at most {plan.max_gaussians} with --offload {cfg.offload}"
            )
    max_gaussians = plan.max_gaussians if plan else None
    if cfg.offload == "none":
        engine: Engine = ResidentEngine(params, **common)
    elif cfg.offload == "naive":
        engine = NaiveEngine(
            params, max_host_bytes=host_bytes, cpu_threads=cfg.cpu_threads, **common
        )
    else:
        cache_rows = plan.cache_rows if plan else None
        engine = OffloadEngine(
            params,
            cache_rows=cache_rows,
            max_host_bytes=host_bytes,
            cpu_threads=cfg.cpu_threads,
            **common,
        )
        host_rows = engine.host.store.max_rows()
        if host_rows is not None:
            max_gaussians = min(max_gaussians or host_rows, host_rows)
            log.info(
                "host budget %.1f GiB: up to %.2fM Gaussians at %d B each",
                cfg.max_host_gb,
                host_rows / 1e6,
                engine.host.store.bytes_per_row,
            )
    if cfg.max_gaussians is not None:
        max_gaussians = min(max_gaussians or cfg.max_gaussians, cfg.max_gaussians)
    engine.max_gaussians = max_gaussians
    if cfg.max_gpu_gb is not None and max_gaussians is not None:
        engine.reserve(max_gaussians)  # a hard budget: take it now, never grow past it
    return engine
