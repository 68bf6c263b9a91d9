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
  metro  3600 of 1920x1080,   1M points; GPU, 1600 blocks (2 km x 2 km), ~7600 buildings;
         2400 aerial views surveying the whole city at 250, 320 and 390 m (each sees about
         1-5% of the surfaces), 1200 street views of the facades (each sees far less)

OUT receives images/ (PNG, or JPEG quality 95 from 720 rows up), images_F/ for each
--downscales factor, sparse/0/{cameras,images,points3D}.bin and synthetic.json (the
parameters and the geometry, from which dense surface points can be sampled later).

--dense N also writes OUT/dense_N.ply: N Gaussians sampled uniformly by area on the visible
surfaces, coloured as the images show them, as a 3DGS PLY at SH degree 0 (68 bytes a
Gaussian: 150M are 10 GB) in the world frame of the COLMAP model; isotropic, sized by the
mean spacing of N points over the surface area, opacity 0.5. With --dense-only it is
sampled for the scene already in OUT (its synthetic.json), which is not rendered again.
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
    parser.add_argument("--size", help="preset: tiny, small, medium, city or metro (default: tiny)")
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
    parser.add_argument(
        "--dense",
        type=int,
        metavar="N",
        help="also write OUT/dense_N.ply, N Gaussians on the surfaces (see below)",
    )
    parser.add_argument(
        "--dense-only",
        action="store_true",
        help="with --dense: only sample the scene already in OUT, rendering nothing",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


_SCENE_OPTIONS = ("size", "images", "width", "height", "points", "downscales")


def _synth(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.dense_only:
        if args.dense is None:
            raise ClmError("--dense-only needs --dense N")
        given = [f"--{name}" for name in _SCENE_OPTIONS if getattr(args, name)]
        if given:
            raise ClmError(
                f"--dense-only samples the scene already in {args.out}: drop {', '.join(given)}"
            )
    # torch imports after the flags are checked
    from clm.devices import resolve_device
    from clm.synthetic.dense import check_dense, write_dense_ply
    from clm.synthetic.generate import generate_scene

    out = Path(args.out)
    if args.dense is not None:
        check_dense(out, args.dense)
    if not args.dense_only:
        generate_scene(
            out,
            args.size or "tiny",
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
    if args.dense is not None:
        path, written = write_dense_ply(
            out,
            args.dense,
            seed=args.seed,
            device=resolve_device(args.device),
            progress=not args.quiet,
        )
        print(f"{path}: {written} Gaussians on the surfaces, SH degree 0")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _synth(argv))


if __name__ == "__main__":
    sys.exit(main())
