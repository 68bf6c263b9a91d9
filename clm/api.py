"""The Python entry point for offloading your own splatting variant.

Declare the variant's attributes as a :class:`~clm.model.spec.GaussianSpec` (say which ones
culling needs with ``key=True``: those stay on the GPU) and pass a render function with the
:class:`~clm.render.base.RenderFn` signature; every other attribute lives in pinned host memory
and moves per view, exactly as 3DGS's colours do. See ``clm.variants.features`` for a complete
example and README.md for a walkthrough.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from clm.engine.base import Engine
from clm.model.spec import AttributeSpec, GaussianSpec, gaussian_splatting_spec
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates, adam_betas
from clm.render.base import RenderFn, RenderOutput, View
from clm.train.config import TrainConfig
from clm.train.engine_factory import make_engine

__all__ = [
    "AttributeSpec",
    "Engine",
    "GaussianSpec",
    "RenderFn",
    "RenderOutput",
    "View",
    "create_engine",
    "gaussian_splatting_spec",
]


def create_engine(
    spec: GaussianSpec,
    params: Mapping[str, Tensor],
    render_fn: RenderFn,
    *,
    total_steps: int,
    batch_size: int = 1,
    extent: float = 1.0,
    offload: str = "clm",
    device: torch.device | str = "cuda",
    max_gpu_gb: float | None = None,
    max_host_gb: float | None = None,
    max_pixels: int = 1920 * 1080,
    views: Sequence[View] = (),
) -> Engine:
    """An engine holding ``params`` (raw values, ``[N, *shape]`` per attribute of ``spec``).

    ``engine.train_step(views, loss_fn, observe, sh_degree, background)`` renders each view
    with ``render_fn``, backpropagates ``loss_fn(i, output)`` and applies one Adam step with
    the spec's learning rates (Grendel-GS scaling for ``batch_size``); ``engine.snapshot()``
    returns every parameter, up to date, on the CPU. ``views`` (the training views, optional)
    let the ``--max-gpu-gb`` planner size the row cache from what each view sees.
    """
    cfg = TrainConfig(
        offload=offload,
        batch_size=batch_size,
        max_gpu_gb=max_gpu_gb,
        max_host_gb=max_host_gb,
    )
    device = torch.device(device)
    lrs = LearningRates(spec, total_steps, extent=extent, batch_size=batch_size)
    adam = AdamConfig(betas=adam_betas(batch_size))
    return make_engine(cfg, spec, params, render_fn, lrs, adam, device, max_pixels, views)
