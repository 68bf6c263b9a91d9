"""``clm-render SOURCE``: render a trained model at the scene's cameras to PNG files, or along a
camera path (an orbit, a path through the training cameras, or a JSON file) into a video or a
folder of frames; optionally with depth maps, and ground truth | render | error side by side.

Frames go one at a time from the engine to the disk, so a path through a model larger than the
GPU renders in the memory of one frame."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from clm.cli.common import OneLineParser, positive_float, positive_int, run_cli
from clm.cli.model_source import (
    Model,
    add_source_arguments,
    background_of,
    render_engine,
    scene_for,
)
from clm.data.images import ImageCache
from clm.data.types import Scene
from clm.engine.base import Engine
from clm.errors import ClmError
from clm.files import atomic_write, save_png
from clm.methods.base import Method
from clm.render.base import RenderOutput, View
from clm.render.camera_file import read_camera_file
from clm.render.camera_path import (
    PathCamera,
    interpolate,
    orbit,
    output_size,
    scale_intrinsics,
    scene_up,
)
from clm.render.splats import split_depth
from clm.report.colormap import ERROR_FULL_SCALE, colorize_depth, depth_range, error_map
from clm.report.video import VIDEO_SUFFIXES, VideoWriter, is_video
from clm.train.evaluate import to_uint8
from clm.train.views import frame_to_view

DEFAULT_FRAMES = 120
DEFAULT_FPS = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clm-render",
        description="Render a trained model at a scene's cameras, or along a camera path.",
    )
    add_source_arguments(parser, needs_scene=True)
    parser.add_argument(
        "--split",
        choices=["test", "train", "all"],
        help="which of the scene's cameras to render (default: test; not with --path)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="folder for the PNGs (default: SOURCE/renders/SPLIT); with --path, a video "
        f"({', '.join(VIDEO_SUFFIXES)}) or a folder of frames (default: "
        "SOURCE/renders/PATH.mp4)",
    )
    parser.add_argument(
        "--path",
        metavar="orbit|interp|FILE.json",
        help="render along a camera path instead: 'orbit' circles the point the training "
        "cameras look at, at their median height and distance, upright as they are; "
        "'interp' flies through the training cameras (Catmull-Rom positions, slerped "
        "rotations); a JSON file lists poses in the scene's frame (see README)",
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        help=f"frames along an orbit or interp path (default: {DEFAULT_FRAMES})",
    )
    parser.add_argument(
        "--fps",
        type=positive_float,
        help=f"frames per second of a video (default: {DEFAULT_FPS:g})",
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        help="path frame width (default: the first training camera's; alone, the height "
        "follows at the same aspect; the vertical field of view is kept)",
    )
    parser.add_argument("--height", type=positive_int, help="path frame height (as --width)")
    parser.add_argument(
        "--depth",
        action="store_true",
        help="also write depth: the expected camera-space z of each pixel, i.e. the splats' "
        "alpha-weighted z divided by the pixel's alpha where alpha > 0 (0 where alpha = 0), in "
        "the scene's units, as NAME_depth.npy (float32) and NAME_depth.png (near bright, far "
        "dark, each image's 1st to 99th percentile); with a video, a second video "
        "NAME_depth.mp4 coloured on the range of its first frame",
    )
    parser.add_argument(
        "--normals",
        action="store_true",
        help="also write the rendered normals, for a method that renders them (2dgs): "
        "world-frame, alpha-weighted, as NAME_normals.npy (float32 [H, W, 3]) and "
        "NAME_normals.png (x, y, z from [-1, 1] to colour); scene cameras only",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also write NAME_compare.png: ground truth | render | error map (the mean "
        f"absolute error per pixel, bright at {ERROR_FULL_SCALE:g} or more); scene cameras only",
    )
    return parser


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse combinations that mean nothing, before anything is loaded."""
    if args.path is None:
        for flag in ("frames", "fps", "width", "height"):
            if getattr(args, flag) is not None:
                raise ClmError(f"--{flag} applies to --path renders")
        if args.output is not None and is_video(args.output):
            raise ClmError(f"{args.output}: a video needs --path (the scene's cameras go to PNGs)")
        return
    if args.split is not None:
        raise ClmError("--split chooses the scene's cameras; it does not apply with --path")
    if args.compare:
        raise ClmError("--compare needs ground truth: the scene's cameras, not a --path")
    if args.normals:
        raise ClmError("--normals applies to the scene's cameras, not a --path")
    if args.path not in ("orbit", "interp") and args.frames is not None:
        raise ClmError(f"--frames applies to orbit and interp; {args.path} has its own cameras")


def _render(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _check_flags(args)
    scene, model = scene_for(args)
    base = args.source if args.source.is_dir() else args.source.parent
    if args.path is not None:
        return _render_path(args, scene, model, base)
    return _render_split(args, scene, model, base)


# ---- what one frame gives -------------------------------------------------------------------


def _render_frame(
    engine: Engine, view: View, model: Model, background: Tensor, depth: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """uint8 RGB, and with ``depth`` the depth in the scene's units and alpha (float32 [H, W])."""
    return _frame_outputs(engine.render(view, model.sh_degree, background), model, depth)


def _frame_outputs(
    out: RenderOutput, model: Model, depth: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """What :func:`_render_frame` gives, from a render."""
    if not depth:
        return to_uint8(out.image[..., :3]), None, None
    rgb, z = split_depth(out.image[..., :4])
    z = (z / model.to_train.scale).cpu().numpy().astype(np.float32)
    return to_uint8(rgb), z, out.alpha[..., 0].cpu().numpy()


def _save_depth(folder: Path, stem: str, depth: np.ndarray, alpha: np.ndarray) -> None:
    atomic_write(folder / f"{stem}_depth.npy", lambda fh: np.save(fh, depth))
    near_far = depth_range(depth, alpha) or (0.0, 1.0)
    save_png(folder / f"{stem}_depth.png", colorize_depth(depth, alpha, *near_far))


def _save_normals(folder: Path, stem: str, out: RenderOutput, model: Model) -> None:
    normals = model.method.normals(out)
    if normals is None:
        raise ClmError(f"--normals: method {model.method.name} rendered no normals")
    values = normals.float().cpu().numpy()
    atomic_write(folder / f"{stem}_normals.npy", lambda fh: np.save(fh, values))
    save_png(folder / f"{stem}_normals.png", to_uint8(normals * 0.5 + 0.5))


# ---- the scene's cameras --------------------------------------------------------------------


def _render_split(args: argparse.Namespace, scene: Scene, model: Model, base: Path) -> int:
    split = args.split or "test"
    chosen = {"test": scene.test, "train": scene.train, "all": scene.train + scene.test}[split]
    if not chosen:
        raise ClmError(f"no {split} images in {scene.root}")
    out_dir = args.output or base / "renders" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        images = None
        if args.compare:
            cache_dir = base / "cache" if args.source.is_dir() else scene.root / ".clm-cache"
            images = stack.enter_context(ImageCache(chosen, cache_dir, scene.background))
        if args.normals and type(model.method).normals is Method.normals:
            raise ClmError(f"--normals: method {model.method.name} renders no normals")
        engine = render_engine(
            model,
            args.device,
            max(f.width * f.height for f in chosen),
            args.depth,
            training=args.normals,
        )
        stack.callback(engine.close)
        background = background_of(scene, engine.device)
        with torch.no_grad():
            for i, frame in enumerate(tqdm(chosen, desc="render", unit="img")):
                view = frame_to_view(frame, engine.device)
                out = engine.render(view, model.sh_degree, background)
                rgb, depth, alpha = _frame_outputs(out, model, args.depth)
                stem = Path(frame.name).with_suffix("").as_posix().replace("/", "_")
                save_png(out_dir / f"{stem}.png", rgb)
                if args.normals:
                    _save_normals(out_dir, stem, out, model)
                if depth is not None and alpha is not None:
                    _save_depth(out_dir, stem, depth, alpha)
                if images is not None:
                    target = np.asarray(images.get(i))
                    side_by_side = np.concatenate([target, rgb, error_map(target, rgb)], axis=1)
                    save_png(out_dir / f"{stem}_compare.png", side_by_side)
    print(f"{len(chosen)} images -> {out_dir}")
    return 0


# ---- camera paths ---------------------------------------------------------------------------


def path_cameras(
    scene: Scene,
    path: str,
    frames: int = DEFAULT_FRAMES,
    width: int | None = None,
    height: int | None = None,
) -> list[PathCamera]:
    """The cameras of ``--path`` in the training frame, at the size asked for (each camera's
    intrinsics scaled with it)."""
    first = (scene.train + scene.test)[0]
    poses = [f.world_to_camera for f in scene.train]
    if path in ("orbit", "interp"):
        make = orbit if path == "orbit" else interpolate
        cameras = [PathCamera(p, first.K, first.width, first.height) for p in make(poses, frames)]
    else:
        up = scene_up([f.world_to_camera for f in scene.train + scene.test])
        in_scene = read_camera_file(Path(path), first.K, (first.width, first.height), up)
        cameras = [
            PathCamera(scene.to_train.pose_to_train(c.world_to_camera), c.K, c.width, c.height)
            for c in in_scene
        ]
    resized = []
    for c in cameras:
        size = output_size(c.width, c.height, width, height)
        resized.append(
            PathCamera(c.world_to_camera, scale_intrinsics(c.K, c.width, c.height, *size), *size)
        )
    return resized


def _path_view(camera: PathCamera, device: torch.device) -> View:
    return View(
        torch.as_tensor(camera.world_to_camera, dtype=torch.float32, device=device),
        torch.as_tensor(camera.K, dtype=torch.float32, device=device),
        camera.width,
        camera.height,
    )


def _render_path(args: argparse.Namespace, scene: Scene, model: Model, base: Path) -> int:
    cameras = path_cameras(scene, args.path, args.frames or DEFAULT_FRAMES, args.width, args.height)
    name = args.path if args.path in ("orbit", "interp") else Path(args.path).stem
    output = args.output or base / "renders" / f"{name}.mp4"
    video = is_video(output)
    if video and len({(c.width, c.height) for c in cameras}) > 1:
        raise ClmError(f"{args.path}: the cameras differ in size; a video needs one size")
    fps = args.fps or DEFAULT_FPS
    with ExitStack() as stack:
        # The writers first: a missing video extra is reported before the model loads.
        rgb_out = depth_out = None
        if video:
            rgb_out = stack.enter_context(VideoWriter(output, fps))
            if args.depth:
                depth_path = output.with_name(f"{output.stem}_depth{output.suffix}")
                depth_out = stack.enter_context(VideoWriter(depth_path, fps))
        else:
            output.mkdir(parents=True, exist_ok=True)
        engine = render_engine(
            model, args.device, max(c.width * c.height for c in cameras), args.depth
        )
        stack.callback(engine.close)
        background = background_of(scene, engine.device)
        near_far = None  # a depth video keeps the colour range of its first drawn frame
        with torch.no_grad():
            for i, camera in enumerate(tqdm(cameras, desc=name, unit="frame")):
                view = _path_view(camera, engine.device)
                rgb, depth, alpha = _render_frame(engine, view, model, background, args.depth)
                if rgb_out is None:
                    save_png(output / f"frame_{i:05d}.png", rgb)
                    if depth is not None and alpha is not None:
                        _save_depth(output, f"frame_{i:05d}", depth, alpha)
                    continue
                rgb_out.append(rgb)
                if depth_out is not None and depth is not None and alpha is not None:
                    near_far = near_far or depth_range(depth, alpha)
                    depth_out.append(colorize_depth(depth, alpha, *(near_far or (0.0, 1.0))))
    print(f"{len(cameras)} frames -> {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _render(argv))


if __name__ == "__main__":
    sys.exit(main())
