"""``clm-train SCENE``: train a scene (see ``clm-train --help``)."""

from __future__ import annotations

import sys
from pathlib import Path

from clm.cli.common import run_cli
from clm.errors import ClmError
from clm.train.checkpoint import open_checkpoint
from clm.train.config import TrainConfig, config_from_dict, make_config, parse_flags


def _train(argv: list[str] | None) -> int:
    from clm.train.trainer import Interrupted, Trainer  # heavy imports after argument checks

    given = parse_flags(argv)
    checkpoint = None
    if given.get("resume"):
        output = Path(given.get("output", TrainConfig.output))
        if not output.is_dir():
            raise ClmError(f"--resume: {output} is not a run folder")
        checkpoint = open_checkpoint(output)
        cfg = make_config(given, base=config_from_dict(checkpoint.meta["config"]))
    else:
        cfg = make_config(given)
    trainer = Trainer(cfg, checkpoint)
    try:
        metrics = trainer.run()
    except Interrupted as exc:
        print(f"{exc}; resume with: clm-train --resume --output {cfg.output}", file=sys.stderr)
        return 130
    finally:
        trainer.close()
    psnr = metrics.get("psnr")
    summary = f"held-out PSNR {psnr:.2f} dB, SSIM {metrics['ssim']:.4f}" if psnr else "no test set"
    print(f"{cfg.output / 'point_cloud.ply'}: {metrics['num_gaussians']} Gaussians; {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _train(argv))


if __name__ == "__main__":
    sys.exit(main())
