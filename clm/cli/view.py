"""``clm-view RUN|PLY``: open a trained model in the web viewer (as ``clm-train --viewer`` shows
a model while it trains), rendering through an engine at each browser's camera until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

import numpy as np

from clm.cli.common import OneLineParser, positive_float, run_cli
from clm.cli.model_source import add_source_arguments, background_of, render_engine, scene_for
from clm.viewer.camera import ViewerCamera, start_pose
from clm.viewer.render import default_max_side, pixel_cap, render_frame
from clm.viewer.server import Viewer, import_viser
from clm.viewer.status import model_status


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clm-view", description="Open a trained model in the web viewer (needs clm[viewer])."
    )
    add_source_arguments(parser, needs_scene=True)
    parser.add_argument(
        "--port",
        type=_port,
        default=8080,
        help="port to serve on, the next free one when taken (default: 8080)",
    )
    parser.add_argument(
        "--fps",
        type=positive_float,
        default=10.0,
        help="most frames a second it renders (default: 10)",
    )
    return parser


def _view(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    import_viser("clm-view")  # before the model loads
    scene, model = scene_for(args)
    frames = scene.train + scene.test
    largest = max(f.width * f.height for f in frames)
    with ExitStack() as stack:
        engine = render_engine(model, args.device, largest)
        stack.callback(engine.close)
        max_pixels = pixel_cap(largest, model.config.get("max_gpu_gb"), engine.device)
        background = background_of(scene, engine.device)
        viewer = Viewer("clm-view", args.port, args.fps, 1.0, default_max_side(engine.device))
        stack.callback(viewer.close)
        cameras = scene.train or frames
        poses = [f.world_to_camera for f in cameras]
        viewer.set_start(start_pose(poses, cameras[0].K, cameras[0].height))
        viewer.set_status(
            model_status(str(args.source), model.count, model.sh_degree, engine.device)
        )

        def render(camera: ViewerCamera, max_side: int) -> np.ndarray:
            return render_frame(engine, camera, model.sh_degree, background, max_side, max_pixels)

        print(f"viewer: {viewer.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        viewer.serve(render, 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _view(argv))


if __name__ == "__main__":
    sys.exit(main())
