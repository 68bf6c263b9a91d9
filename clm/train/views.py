"""Frames as renderable views, and the order in which training visits them."""

from __future__ import annotations

import numpy as np
import torch

from clm.data.types import Frame
from clm.render.base import View


def frame_to_view(frame: Frame, device: torch.device) -> View:
    return View(
        viewmat=torch.as_tensor(frame.world_to_camera, dtype=torch.float32, device=device),
        K=torch.as_tensor(frame.K, dtype=torch.float32, device=device),
        width=frame.width,
        height=frame.height,
    )


class BatchSampler:
    """Epochs of the training frames in a seeded random order, B at a time.

    A batch never holds the same frame twice; an epoch's leftover frames start the next batch.
    The state is two integers and the seed, so a resumed run draws the same batches.
    """

    def __init__(self, num_frames: int, batch_size: int, seed: int) -> None:
        if num_frames < 1:
            raise ValueError("no training frames")
        self.num_frames = num_frames
        self.batch_size = min(batch_size, num_frames)
        self.seed = seed
        self.epoch = 0
        self.cursor = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_frames)

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._order(self.epoch)
            for idx in order[self.cursor :]:
                self.cursor += 1
                if int(idx) not in batch:
                    batch.append(int(idx))
                    if len(batch) == self.batch_size:
                        break
            if self.cursor >= self.num_frames:
                self.epoch, self.cursor = self.epoch + 1, 0
        return batch

    def peek(self) -> list[int]:
        """The batch :meth:`next_batch` will return next, without drawing it."""
        state = self.state_dict()
        batch = self.next_batch()
        self.load_state_dict(state)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
