"""The Python entry points: train a scene with a method, or drive an engine yourself.

:func:`train` runs the whole trainer (data, density control, checkpoints, evaluation, PLY) for
any :class:`~clm.methods.base.Method`: the built-in ones (:class:`GaussianSplatting`,
:class:`Surfels`) or yours. A method declares its attributes as a
:class:`~clm.model.spec.GaussianSpec` (``key=True`` for those culling needs: they stay on the
GPU; every other attribute lives in pinned host memory and moves per view, exactly as 3DGS's
colours do), its renderer, loss, split and file format. README.md shows a complete one.

:func:`create_engine` is the lower level: an engine holding your parameters, stepping them
with your render and loss functions (see ``clm.variants.features``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clm.engine.base import Engine
from clm.methods.base import Method
from clm.methods.gaussians import GaussianSplatting, split_in_axes
from clm.methods.registry import available_methods, make_method
from clm.methods.surfels import Surfels
from clm.model.spec import AttributeSpec, CullRoles, GaussianSpec, gaussian_splatting_spec
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates, adam_betas
from clm.render.base import RenderFn, RenderOutput, View
from clm.train.config import make_config
from clm.train.engine_factory import EngineOptions, make_engine

__all__ = [
    "AttributeSpec",
    "CullRoles",
    "Engine",
    "GaussianSpec",
    "GaussianSplatting",
    "Method",
    "RenderFn",
    "RenderOutput",
    "Surfels",
    "View",
    "available_methods",
    "create_engine",
    "gaussian_splatting_spec",
    "make_method",
    "split_in_axes",
    "train",
]


def train(
    scene: str | Path, output: str | Path, method: Method | str = "3dgs", **options: Any
) -> dict[str, Any]:
    """Train ``scene`` with ``method`` (an object, or a registered name) into ``output``, as
    ``clm-train`` does; ``options`` are :class:`~clm.train.config.TrainConfig` fields
    (``steps=3000, offload="clm", max_gpu_gb=24``, a ``preset``...). Returns the final
    metrics (held-out PSNR, SSIM, LPIPS, Gaussians)."""
    from clm.train.trainer import Trainer  # (the trainer's imports are heavy)

    if isinstance(method, str):
        options["method"] = method
        chosen = None
    else:
        chosen = method
    cfg = make_config({"scene": Path(scene), "output": Path(output), **options})
    trainer = Trainer(cfg, method=chosen)
    try:
        return trainer.run()
    finally:
        trainer.close()


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
    options = EngineOptions(offload, batch_size, max_gpu_gb, max_host_gb)
    device = torch.device(device)
    lrs = LearningRates(spec, total_steps, extent=extent, batch_size=batch_size)
    adam = AdamConfig(betas=adam_betas(batch_size))
    return make_engine(options, spec, params, render_fn, lrs, adam, device, max_pixels, views)
