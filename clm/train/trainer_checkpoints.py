"""The trainer's part in checkpoints: what a run saves besides its rows, and how it restores it.

Mixed into :class:`clm.train.trainer.Trainer`; the rows stream from the engine
(:meth:`Engine.state_chunks`) next to density control's per-row statistics.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clm.engine.base import STREAM_ROWS
from clm.train.checkpoint import Checkpoint, save_checkpoint, state_blocks, state_columns
from clm.train.config import config_to_dict

if TYPE_CHECKING:
    from clm.train.trainer import Trainer

log = logging.getLogger("clm")


class TrainerCheckpoints:
    """Saving and restoring the trainer's state (see the module docstring)."""

    def _meta(self: Trainer) -> dict[str, Any]:
        """Everything but the per-row columns."""
        return {
            "config": config_to_dict(self.cfg),
            # the method with every option, defaults included (the config has those given)
            "method": {"name": self.method.name, "options": self.method.options()},
            "density": self.density.state_dict(),
            "sampler": self.sampler.state_dict(),
            "log": self.log.state_dict(),
            "elapsed": self.elapsed,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
            "to_train": {
                "scale": self.scene.to_train.scale,
                "center": self.scene.to_train.center.tolist(),
            },
            # the steps since the last log row, so a resumed run logs the same window
            "log_window": self.window.state_dict(),
            # what the learning rates and Adam were, to catch up rows saved as they were
            "optimizer": {
                "total_steps": self.total_steps,
                "extent": self.scene.extent,
                "batch_size": self.batch_size,
                "betas": list(self.engine.adam.betas),
                "eps": self.engine.adam.eps,
                # the attributes stored at each row's own step (lazy/last); the others are
                # current (the engine keeps some of the spec's host attributes on the GPU)
                "lazy_attributes": [a.name for a in self.engine.spec.host]
                if self.engine.lazy
                else [],
            },
        }

    def _restore(self: Trainer, ckpt: Checkpoint) -> None:
        meta = ckpt.meta
        names = [f"density/{n}" for n in self.density.ROW_STATE]
        self.density.load_state_dict(meta["density"], ckpt.blocks(names), ckpt.count)
        self.sampler.load_state_dict(meta["sampler"])
        self.log.load_state_dict(meta["log"], ckpt.step)
        if "log_window" in meta:
            self.window.load_state_dict(meta["log_window"], self.device)
        self.elapsed = float(meta.get("elapsed", 0.0))
        random.setstate(meta["rng"]["python"])
        np.random.set_state(meta["rng"]["numpy"])
        torch.set_rng_state(meta["rng"]["torch"])
        log.info("resumed from step %d (%s)", ckpt.step, ckpt.path)

    def save_checkpoint(self: Trainer) -> Path:
        """Stream the whole training state to a new checkpoint (once per step)."""
        if self._saved is not None and self._saved[0] == self.engine.step:
            return self._saved[1]  # already saved at this step
        saved = save_checkpoint(
            self.cfg.output,
            self.engine.step,
            self._meta(),
            state_columns(
                self.spec, {f"density/{n}": () for n in self.density.ROW_STATE}, self.engine.lazy
            ),
            state_blocks(
                self.engine.state_chunks(STREAM_ROWS, lazy=self.engine.lazy),
                lambda a, b: {f"density/{n}": t for n, t in self.density.row_state(a, b).items()},
            ),
            keep=self.cfg.keep_checkpoints,
            rows=self.engine.num_gaussians,
        )
        self._saved = (self.engine.step, saved.path)
        log.info(
            "checkpoint at step %d: %.2f GB in %.1f s -> %s",
            self.engine.step,
            saved.bytes / 1e9,
            saved.seconds,
            saved.path,
        )
        return saved.path
