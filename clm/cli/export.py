"""``clm-export RUN``: write a checkpoint's Gaussians as its method's PLY (the INRIA layout for
3DGS, the 2DGS reference's for 2DGS), in the frame of the scene it was trained on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clm.cli.common import OneLineParser, run_cli
from clm.cli.model_source import load_model
from clm.errors import ClmError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="clm-export", description="Export a checkpoint as a PLY.")
    parser.add_argument("source", type=Path, help="run folder or checkpoint (.ckpt)")
    parser.add_argument("--output", type=Path, help="PLY to write (default: RUN/point_cloud.ply)")
    return parser


def _export(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.source.suffix.lower() == ".ply":
        raise ClmError(f"{args.source}: already a PLY; clm-export reads runs and checkpoints")
    model = load_model(args.source)
    base = args.source if args.source.is_dir() else args.source.parent.parent
    out = args.output or base / "point_cloud.ply"
    spec = model.method.spec(int(model.config["sh_degree"]))
    chunks = (chunk.params for chunk in model.rows(spec).chunks)
    written, dropped = model.method.export_ply(out, spec, chunks, model.count, model.to_train)
    note = f" ({dropped} with non-finite values dropped)" if dropped else ""
    print(f"{written} Gaussians{note} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _export(argv))


if __name__ == "__main__":
    sys.exit(main())
