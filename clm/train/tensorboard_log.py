"""``--tensorboard``: the run's figures as TensorBoard scalars, and at each evaluation a few
held-out views as ground truth | render, under ``OUTPUT/tensorboard``.

Scalars are written when the trainer logs a row (``--log-every``), from the figures it has
already brought to the host, so TensorBoard adds no host sync to a step. The engine's per-step
figures (rows, bytes moved, cache hits) are summed over the same window.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clm.errors import ClmError
from clm.offload.host_budget import process_rss
from clm.train.evaluate import to_uint8
from clm.train.hooks import TrainerHook
from clm.train.views import frame_to_view

if TYPE_CHECKING:
    from clm.train.trainer import Trainer

GIB = float(1 << 30)
EVAL_IMAGES = 3  # held-out views shown at each evaluation: the first ones, by name


class TensorBoardLog(TrainerHook):
    """The writer of one session; ``start_step`` is where a resumed run continues."""

    def __init__(self, folder: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ClmError(
                "--tensorboard needs the tensorboard package: pip install clm[tensorboard] "
                "(or pass --no-tensorboard)"
            ) from None
        # A resumed run drops what the interrupted one wrote after its checkpoint.
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
        self._sums: dict[str, float] = {}
        self._steps = 0

    def after_step(self, trainer: Trainer) -> None:
        stats = trainer.engine.last_stats
        for f in dataclasses.fields(stats):
            value = getattr(stats, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._sums[f.name] = self._sums.get(f.name, 0.0) + value
        self._steps += 1
        step = trainer.engine.step
        if not trainer.log.rows or trainer.log.rows[-1]["step"] != step:
            return
        self._write_row(trainer, trainer.log.rows[-1], step)
        self._sums, self._steps = {}, 0

    def _write_row(self, trainer: Trainer, row: dict[str, Any], step: int) -> None:
        add = self.writer.add_scalar
        add("train/loss", row["loss"], step)
        add("train/psnr", row["train_psnr"], step)
        add("train/gaussians", row["num_gaussians"], step)
        add("train/sh_degree", trainer.sh_degree_now(), step)
        add("speed/images_per_s", row["images_per_s"], step)
        add("memory/host_rss_gib", process_rss() / GIB, step)
        if trainer.device.type == "cuda":
            add("memory/gpu_peak_reserved_gib", row["gpu_mem_gb"], step)
            add("memory/gpu_reserved_gib", torch.cuda.memory_reserved(trainer.device) / GIB, step)
        for name, total in self._sums.items():
            add(f"engine/{name}_per_step", total / self._steps, step)
        lookups = self._sums.get("cache_lookups", 0.0)
        if lookups and "cache_hits" in self._sums:
            add("engine/cache_hit_rate", self._sums["cache_hits"] / lookups, step)
        self.writer.flush()

    def after_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = trainer.engine.step
        for key in ("psnr", "ssim", "lpips"):
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"eval/{key}", metrics[key], step)
        offset = len(trainer.scene.train)
        degree = trainer.sh_degree_now()
        with torch.no_grad():
            for i, frame in enumerate(trainer.scene.test[:EVAL_IMAGES]):
                view = frame_to_view(frame, trainer.engine.device)
                render = to_uint8(
                    trainer.engine.render(view, degree, trainer.background).image[..., :3]
                )
                truth = np.asarray(trainer.images.get(offset + i))
                side_by_side = np.concatenate([truth, render], axis=1)
                self.writer.add_image(f"eval/{frame.name}", side_by_side, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
