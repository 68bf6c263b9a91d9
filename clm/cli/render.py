"""``clm-render SOURCE``: render a trained model at the scene's cameras to PNG files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from clm.cli.common import OneLineParser, run_cli
from clm.cli.model_source import add_source_arguments, background_of, render_engine, scene_for
from clm.files import save_png
from clm.train.evaluate import to_uint8
from clm.train.views import frame_to_view


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clm-render", description="Render a trained model at a scene's cameras."
    )
    add_source_arguments(parser, needs_scene=True)
    parser.add_argument(
        "--split", choices=["test", "train", "all"], default="test", help="which cameras"
    )
    parser.add_argument(
        "--output", type=Path, help="folder for the PNGs (default: SOURCE/renders/SPLIT)"
    )
    return parser


def _render(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    scene, model = scene_for(args)
    frames = {"test": scene.test, "train": scene.train, "all": scene.train + scene.test}
    chosen = frames[args.split]
    if not chosen:
        print(f"no {args.split} images in {scene.root}", file=sys.stderr)
        return 1
    base = args.source if args.source.is_dir() else args.source.parent
    out_dir = args.output or base / "renders" / args.split
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = render_engine(model, args.device, max(f.width * f.height for f in chosen))
    background = background_of(scene, engine.device)
    try:
        with torch.no_grad():
            for frame in tqdm(chosen, desc="render", unit="img"):
                image = engine.render(
                    frame_to_view(frame, engine.device), model.sh_degree, background
                ).image
                stem = Path(frame.name).with_suffix("").as_posix().replace("/", "_")
                save_png(out_dir / f"{stem}.png", to_uint8(image))
    finally:
        engine.close()
    print(f"{len(chosen)} images -> {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _render(argv))


if __name__ == "__main__":
    sys.exit(main())
