"""``clm-train --viewer``: the live viewer as a trainer hook. The server opens before the scene
loads; after each step the hook updates the progress text (at most twice a second) and, when one
is due, renders one frame on the training thread; after training it keeps serving the final
model until Ctrl-C."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from clm.train.hooks import TrainerHook
from clm.train.trainer import Trainer
from clm.viewer.camera import ViewerCamera, start_pose
from clm.viewer.render import default_max_side, pixel_cap, render_frame
from clm.viewer.server import FrameRenderer, Viewer
from clm.viewer.status import training_status

log = logging.getLogger("clm")

# Frames never take more than this share of the training thread's time (see Viewer).
TRAINING_SHARE = 0.2
STATUS_EVERY_S = 0.5  # the progress text changes at most this often


class TrainingViewer(TrainerHook):
    def __init__(self, port: int, fps: float, device: torch.device) -> None:
        self.viewer = Viewer("--viewer", port, fps, TRAINING_SHARE, default_max_side(device))
        log.info("viewer: %s", self.viewer.url)
        self._started = False
        self._max_pixels: int | None = None
        self._status_at = 0.0

    def _renderer(self, trainer: Trainer) -> FrameRenderer:
        if not self._started:  # the first call: the scene has loaded
            train = trainer.scene.train
            poses = [f.world_to_camera for f in train]
            self.viewer.set_start(start_pose(poses, train[0].K, train[0].height))
            largest = max(f.width * f.height for f in train + trainer.scene.test)
            self._max_pixels = pixel_cap(largest, trainer.cfg.max_gpu_gb, trainer.device)
            self._started = True

        def render(camera: ViewerCamera, max_side: int) -> np.ndarray:
            return render_frame(
                trainer.engine,
                camera,
                trainer.sh_degree_now(),
                trainer.background,
                max_side,
                self._max_pixels,
            )

        return render

    def after_step(self, trainer: Trainer) -> None:
        render = self._renderer(trainer)
        now = time.perf_counter()
        if now - self._status_at >= STATUS_EVERY_S:
            self.viewer.set_status(training_status(trainer, done=False))
            self._status_at = now
        self.viewer.draw_due(render, trainer.engine.step)

    def after_training(self, trainer: Trainer) -> None:
        render = self._renderer(trainer)
        self.viewer.set_status(training_status(trainer, done=True))
        log.info("training done; the viewer at %s stays open until Ctrl-C", self.viewer.url)
        self.viewer.serve(render, trainer.engine.step)

    def close(self) -> None:
        self.viewer.close()
