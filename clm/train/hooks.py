"""What watches a run from beside the loop (TensorBoard, the live viewer): the trainer calls each
hook on its own thread at fixed points, so a hook may use the engine (engines are not
thread-safe) and the loop itself stays the same whichever are on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from clm.train.config import TrainConfig

if TYPE_CHECKING:
    from clm.train.trainer import Trainer


class TrainerHook:
    """Does nothing at every point; a hook overrides the points it needs."""

    def after_step(self, trainer: Trainer) -> None:
        """After each optimiser step and its logging, evaluation and checkpoint."""

    def after_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After each held-out evaluation (``metrics`` as ``evaluate`` returns them)."""

    def after_training(self, trainer: Trainer) -> None:
        """Once training is done and its outputs are written."""

    def close(self) -> None:
        """Release what the hook holds; called however the run ends."""


def make_hooks(cfg: TrainConfig, start_step: int, device: torch.device) -> list[TrainerHook]:
    """The hooks the options ask for, in the order they run; made before the scene loads, so a
    missing optional package is reported at once. ``start_step`` is the step a resumed run
    continues from (0 for a new run); ``device`` is the one training runs on."""
    hooks: list[TrainerHook] = []
    try:
        if cfg.tensorboard:
            from clm.train.tensorboard_log import TensorBoardLog

            hooks.append(TensorBoardLog(cfg.output / "tensorboard", start_step))
        if cfg.viewer:
            from clm.viewer.training import TrainingViewer

            hooks.append(TrainingViewer(cfg.viewer_port, cfg.viewer_fps, device))
    except BaseException:
        for hook in hooks:
            hook.close()
        raise
    return hooks
