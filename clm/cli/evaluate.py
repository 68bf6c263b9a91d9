"""``clm-eval SOURCE``: PSNR, SSIM (and LPIPS where available) on a scene's held-out views."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clm.cli.common import OneLineParser, run_cli
from clm.cli.model_source import add_source_arguments, background_of, render_engine, scene_for
from clm.data.images import ImageCache
from clm.errors import ClmError
from clm.files import write_json
from clm.train.evaluate import evaluate


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clm-eval", description="Evaluate a trained model on a scene's held-out views."
    )
    add_source_arguments(parser, needs_scene=True)
    parser.add_argument(
        "--output", type=Path, help="metrics JSON (default: SOURCE/eval_metrics.json)"
    )
    parser.add_argument("--renders", type=Path, help="also save the rendered views here")
    return parser


def _evaluate(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    scene, model = scene_for(args)
    if not scene.test:
        raise ClmError(f"no held-out images in {scene.root} (was it trained with --test-every 0?)")
    base = args.source if args.source.is_dir() else args.source.parent
    cache_dir = base / "cache" if args.source.is_dir() else scene.root / ".clm-cache"
    images = ImageCache(scene.test, cache_dir, scene.background)
    engine = render_engine(model, args.device, max(f.width * f.height for f in scene.test))
    try:
        metrics = evaluate(
            engine,
            scene.test,
            images,
            list(range(len(scene.test))),
            model.sh_degree,
            background_of(scene, engine.device),
            render_dir=args.renders,
            with_lpips=True,
        )
    finally:
        engine.close()
        images.close()
    out = args.output or base / "eval_metrics.json"
    write_json(out, metrics)
    lpips = metrics.get("lpips")
    extra = f", LPIPS {lpips:.4f}" if lpips is not None else ""
    print(
        f"{metrics['num_images']} views: PSNR {metrics['psnr']:.2f} dB, "
        f"SSIM {metrics['ssim']:.4f}{extra} -> {out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _evaluate(argv))


if __name__ == "__main__":
    sys.exit(main())
