"""``clm-synth OUT``: generate a synthetic city scene in COLMAP layout (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from clm.cli.common import run_cli
from clm.errors import ClmError

_EPILOG = """\
presets (images of width x height, sparse points; where it is meant to run):
  tiny     40 of 96x72,       3k points; CPU, seconds (tests, README demo)
  small   100 of 320x240,    10k points; CPU, well under a minute
  medium  300 of 1920x1080, 100k points; GPU, 16 blocks, ~60 buildings
  city   2000 of 1920x1080, 500k points; GPU, 196 blocks, ~650 buildings

OUT receives images/ (PNG, or JPEG quality 95 from 720 rows up), images_F/ for each
--downscales factor, sparse/0/{cameras,images,points3D}.bin and synthetic.json (the
parameters and the geometry, from which dense surface points can be sampled later).
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become a ClmError: one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise ClmError(f"{message} (see {self.prog} --help)")


def _factors(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,4,8, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clm-synth",
        description=(
            "Generate a synthetic city (textured streets, buildings, trees) ray-cast from "
            "aerial and street-level cameras, written as a COLMAP scene with an SfM-like "
            "sparse point cloud. The same options and seed give the same scene."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", metavar="OUT", help="output folder (created if missing)")
    parser.add_argument(
        "--size", default="tiny", help="preset: tiny, small, medium or city (default: tiny)"
    )
    parser.add_argument(
        "--images", type=int, help="number of images (default: the preset's), about 60%% aerial"
    )
    parser.add_argument(
        "--width",
        type=int,
        help="image width in pixels (default: the preset's; alone, keeps its aspect)",
    )
    parser.add_argument(
        "--height",
        type=int,
        help="image height in pixels (default: the preset's; alone, keeps its aspect)",
    )
    parser.add_argument(
        "--points", type=int, help="number of sparse SfM-like points (default: the preset's)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the city layout, cameras and noise (default: 0)",
    )
    parser.add_argument(
        "--device",
        help="torch device to ray-cast on: cpu or cuda[:N] (default: cuda when available)",
    )
    parser.add_argument(
        "--downscales",
        type=_factors,
        default=(),
        metavar="F[,F...]",
        help="also write images_F/ downscaled by each factor F, e.g. 2,4,8",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _synth(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    from clm.synthetic.generate import generate_scene  # torch import after the flags are checked

    out = generate_scene(
        Path(args.out),
        args.size,
        images=args.images,
        width=args.width,
        height=args.height,
        points=args.points,
        seed=args.seed,
        device=args.device,
        downscales=args.downscales,
        progress=not args.quiet,
    )
    info = json.loads((out / "synthetic.json").read_text())["generator"]
    print(
        f"{out}: {info['images']} images ({info['aerial_images']} aerial) of "
        f"{info['width']}x{info['height']}, {info['points']} sparse points"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _synth(argv))


if __name__ == "__main__":
    sys.exit(main())
