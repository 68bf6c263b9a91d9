"""``clm-train SCENE``: train a scene (see ``clm-train --help``)."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from clm.cli.common import run_cli
from clm.cli.train_flags import parse_flags
from clm.data.scene import load_scene
from clm.errors import ClmError
from clm.train.checkpoint import Checkpoint, list_checkpoints, open_checkpoint
from clm.train.config import TrainConfig, config_from_dict, make_config

log = logging.getLogger(__name__)

# Options a run cannot change midway: the method (and its options) sets the model's attributes
# and the loss; the batch size sets every step's learning rates, Adam betas
# and intervals; the SH degree sets the model's columns; the held-out split sets the training
# images and, through their cameras, the frame the Gaussians live in.
_FIXED_ON_RESUME = ("method", "method_options", "batch_size", "sh_degree", "test_every")


def _train(argv: list[str] | None) -> int:
    from clm.train.trainer import Interrupted, Trainer  # heavy imports after argument checks

    given = parse_flags(argv)
    checkpoint = None
    if given.get("resume"):
        output = Path(given.get("output", TrainConfig.output))
        if not output.is_dir():
            raise ClmError(f"--resume: {output} is not a run folder")
        checkpoint = open_checkpoint(output)
        _check_resume(given, checkpoint)
        cfg = make_config(given, base=config_from_dict(checkpoint.meta["config"]))
    else:
        cfg = make_config(given)
    new_output = not cfg.output.exists()
    try:
        trainer = Trainer(cfg, checkpoint)
        try:
            metrics = trainer.run()
        finally:
            trainer.close()
    except Interrupted as exc:
        print(f"{exc}; resume with: clm-train --resume --output {cfg.output}", file=sys.stderr)
        return 130
    except BaseException:
        if new_output:
            _remove_unfinished(cfg.output)
        raise
    psnr = metrics.get("psnr")
    summary = f"held-out PSNR {psnr:.2f} dB, SSIM {metrics['ssim']:.4f}" if psnr else "no test set"
    print(f"{cfg.output / 'point_cloud.ply'}: {metrics['num_gaussians']} Gaussians; {summary}")
    return 0


def _check_resume(given: dict[str, Any], checkpoint: Checkpoint) -> None:
    """Refuse flags that would change the resumed run midway, naming the run's own value."""
    stored = checkpoint.meta["config"]
    for name in _FIXED_ON_RESUME:
        if name in given and given[name] != stored.get(name):
            flag = "--" + name.replace("_", "-")
            raise ClmError(
                f"--resume: this run was trained with {flag} {stored.get(name)}; it cannot "
                f"change to {given[name]} midway (start a new run for that)"
            )
    if "scene" in given:
        _check_same_scene(Path(given["scene"]), stored, checkpoint.meta["to_train"])


def _check_same_scene(scene: Path, stored: dict[str, Any], frame: dict[str, Any]) -> None:
    """Accept the run's scene, also moved to another path (its cameras give the same training
    frame); refuse any other, whose cameras would put the run's Gaussians in the wrong place."""
    old = stored.get("scene")
    if old is not None and Path(old).resolve() == scene.resolve():
        return
    loaded = load_scene(scene, stored["data_factor"], stored["test_every"], seed=stored["seed"])
    to_train = loaded.to_train
    if not (
        np.isclose(to_train.scale, frame["scale"], rtol=1e-6)
        and np.allclose(to_train.center, frame["center"], rtol=1e-6, atol=1e-9)
    ):
        raise ClmError(
            f"--resume: {scene} is not the scene this run trained on ({old}); "
            f"resume without SCENE, or start a new run for another scene"
        )
    log.info("resuming on %s, the run's scene %s at a new path", scene, old)


def _remove_unfinished(output: Path) -> None:
    """Remove an output folder this command created when it failed before any checkpoint, so an
    error leaves nothing to clean up (the trainer has closed its file log by then)."""
    if not list_checkpoints(output):
        shutil.rmtree(output, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _train(argv))


if __name__ == "__main__":
    sys.exit(main())
