"""Load any supported scene folder into a :class:`Scene` ready to train.

Every image's header is checked here, at load time, so a missing or mis-sized file stops
the run before training starts rather than hours into it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from clm.data.colmap import ColmapModel, find_sparse_dir, read_model
from clm.data.images import locate_image
from clm.data.transforms_json import read_blender, read_nerfstudio
from clm.data.types import Frame, Scene, Similarity
from clm.data.undistort import pinhole_for_training, split_camera_params
from clm.errors import ClmError

log = logging.getLogger(__name__)

RANDOM_INIT_POINTS = 100_000
_DEGENERATE = 1e-9


def load_scene(
    path: Path,
    data_factor: int = 1,
    test_every: int = 8,
    normalize: bool = True,
    seed: int = 0,
) -> Scene:
    """Detect the folder's format, read it, split it and move it into the training frame.

    Formats, in the order tried: COLMAP (``sparse/0`` or ``sparse``), nerfstudio
    (``transforms.json``), NeRF-synthetic (``transforms_train.json``). Frames are sorted by
    name and every ``test_every``-th (index 0, test_every, ...) is held out for testing;
    0 holds out none, and NeRF-synthetic uses its own test file unless it is 0.
    """
    root = Path(path)
    if not isinstance(data_factor, int) or data_factor < 1:
        raise ClmError(f"--data-factor must be a positive integer, got {data_factor!r}")
    if not isinstance(test_every, int) or test_every < 0:
        raise ClmError(f"--test-every must be 0 or a positive integer, got {test_every!r}")
    if not root.is_dir():
        raise ClmError(f"{root}: scene folder not found")

    points = colors = None
    if (root / "sparse").is_dir():
        kind, background = "colmap", (0.0, 0.0, 0.0)
        frames, points, colors = _read_colmap(root, data_factor)
        train, test = _split(frames, test_every)
    elif (root / "transforms.json").is_file():
        kind, background = "nerfstudio", (0.0, 0.0, 0.0)
        frames, points, colors = read_nerfstudio(root, data_factor)
        if points is not None:
            points, colors = _finite_points(
                points, colors, f"{root / 'transforms.json'} (ply_file_path)"
            )
        train, test = _split(frames, test_every)
    elif (root / "transforms_train.json").is_file():
        kind, background = "blender", (1.0, 1.0, 1.0)
        train, test = read_blender(root, data_factor)
        train = sorted(train, key=lambda f: f.name)
        test = sorted(test, key=lambda f: f.name) if test_every else []
        if test_every and not test:
            log.info("%s: no transforms_test.json, so no held-out images", root)
    else:
        raise ClmError(
            f"{root}: not a scene folder (expected sparse/0/ or sparse/ from COLMAP, "
            f"transforms.json from nerfstudio, or transforms_train.json from NeRF-synthetic)"
        )
    if not train:
        raise ClmError(f"{root}: no training images left (--test-every {test_every})")

    to_train = _normalization(train) if normalize else Similarity()
    train = [_to_train_frame(f, to_train) for f in train]
    test = [_to_train_frame(f, to_train) for f in test]
    random_init = points is None
    if points is None:
        points, colors = _random_points(train, seed)
        log.info(
            "%s has no point cloud: starting from %d random Gaussians in the cameras' view",
            root,
            RANDOM_INIT_POINTS,
        )
    else:
        points = to_train.to_train(points)
    return Scene(
        root=root,
        kind=kind,
        train=train,
        test=test,
        points=np.ascontiguousarray(points, dtype=np.float32),
        colors=np.ascontiguousarray(colors, dtype=np.uint8),
        to_train=to_train,
        background=background,
        extent=_extent(train),
        random_init=random_init,
    )


def _read_colmap(root: Path, data_factor: int) -> tuple[list[Frame], np.ndarray, np.ndarray]:
    sparse_dir = find_sparse_dir(root)
    model = read_model(sparse_dir)
    fmt = "bin" if (sparse_dir / "images.bin").is_file() else "txt"
    if not model.images:
        raise ClmError(f"{sparse_dir / f'images.{fmt}'}: the model has no images")
    if len(model.points) == 0:
        raise ClmError(
            f"{sparse_dir / f'points3D.{fmt}'}: the point cloud is empty; "
            f"re-run COLMAP's mapper or point_triangulator"
        )
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise ClmError(f"{images_dir}: image folder not found")
    frames = _colmap_frames(model, images_dir, data_factor, sparse_dir, fmt)
    points, colors = _finite_points(
        model.points.xyz, model.points.rgb, str(sparse_dir / f"points3D.{fmt}")
    )
    return frames, points, colors


def _finite_points(
    points: np.ndarray, colors: np.ndarray, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Drop points with NaN or infinite coordinates, saying how many: one of them would spoil
    the neighbour distances that size every initial Gaussian. None left is an error."""
    keep = np.isfinite(points).all(axis=1)
    dropped = int(len(points) - keep.sum())
    if not keep.any():
        raise ClmError(f"{source}: none of its {len(points)} points has finite coordinates")
    if dropped:
        log.warning(
            "%s: dropped %d of %d points with NaN or infinite coordinates",
            source,
            dropped,
            len(points),
        )
    return points[keep], colors[keep]


def _colmap_frames(
    model: ColmapModel, images_dir: Path, data_factor: int, sparse_dir: Path, fmt: str
) -> list[Frame]:
    frames = []
    for image in sorted(model.images.values(), key=lambda im: im.name):
        camera = model.cameras.get(image.camera_id)
        if camera is None:
            raise ClmError(
                f"{sparse_dir / f'images.{fmt}'}: image {image.name} uses camera "
                f"{image.camera_id}, which cameras.{fmt} does not define"
            )
        pose = np.concatenate([image.qvec, image.tvec])
        if not np.isfinite(pose).all() or not np.any(image.qvec):
            raise ClmError(
                f"{sparse_dir / f'images.{fmt}'}: image {image.name} has an unusable pose "
                f"(qvec {image.qvec.tolist()}, tvec {image.tvec.tolist()}: it needs finite "
                f"values and a non-zero quaternion)"
            )
        label = f"{sparse_dir / f'cameras.{fmt}'}: camera {camera.id}"
        intrinsics, coefficients = split_camera_params(camera.model, camera.params, label)
        path, decoded, resize_from = locate_image(
            images_dir, image.name, data_factor, (camera.width, camera.height)
        )
        sx, sy = decoded[0] / camera.width, decoded[1] / camera.height
        fx, fy, cx, cy = intrinsics
        k, width, height, distortion = pinhole_for_training(
            camera.model, (fx * sx, fy * sy, cx * sx, cy * sy), coefficients, *decoded, label
        )
        frames.append(
            Frame(
                name=image.name,
                image_path=path,
                width=width,
                height=height,
                K=k,
                world_to_camera=image.world_to_camera(),
                distortion=distortion,
                camera_id=camera.id,
                resize_from=resize_from,
            )
        )
    return frames


def _split(frames: list[Frame], test_every: int) -> tuple[list[Frame], list[Frame]]:
    ordered = sorted(frames, key=lambda f: f.name)
    if test_every == 0:
        return ordered, []
    train = [f for i, f in enumerate(ordered) if i % test_every]
    test = [f for i, f in enumerate(ordered) if i % test_every == 0]
    return train, test


def _normalization(train: list[Frame]) -> Similarity:
    """Centre on the mean training camera and scale the farthest one to distance 1."""
    centers = np.stack([f.camera_center for f in train])
    center = centers.mean(axis=0)
    radius = float(np.max(np.linalg.norm(centers - center, axis=1)))
    return Similarity(scale=1.0 / radius if radius > _DEGENERATE else 1.0, center=center)


def _to_train_frame(frame: Frame, to_train: Similarity) -> Frame:
    return dataclasses.replace(frame, world_to_camera=to_train.pose_to_train(frame.world_to_camera))


def _extent(train: list[Frame]) -> float:
    """1.1 x the largest distance of a training camera from their mean (INRIA's
    cameras_extent); 1.1 when the cameras all sit in one place, so learning rates stay sane."""
    centers = np.stack([f.camera_center for f in train])
    radius = float(np.max(np.linalg.norm(centers - centers.mean(axis=0), axis=1)))
    return 1.1 * (radius if radius > _DEGENERATE else 1.0)


def _random_points(train: list[Frame], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random points, with random colours, in the box the cameras look at.

    The box is a cube centred on the point nearest (least squares) to all training cameras'
    optical axes, with half-side the median over cameras of (distance to that point) x
    tan(half the wider field of view): what a typical camera sees across at that depth.
    For NeRF-synthetic this is about [-1.45, 1.45]^3, close to INRIA's [-1.3, 1.3]^3. When
    the axes do not meet in front of the cameras (e.g. a forward-facing capture), the centre
    is instead placed along the mean viewing direction, one camera-spread (or 1) ahead of the
    mean camera.
    """
    centers = np.stack([f.camera_center for f in train])
    forwards = np.stack([f.world_to_camera[2, :3] for f in train])  # camera z axis in world
    focus = _axes_focus(centers, forwards)
    if focus is None:
        spread = float(np.max(np.linalg.norm(centers - centers.mean(axis=0), axis=1)))
        direction = forwards.mean(axis=0)
        norm = np.linalg.norm(direction)
        direction = direction / norm if norm > _DEGENERATE else forwards[0]
        focus = centers.mean(axis=0) + direction * (spread if spread > _DEGENERATE else 1.0)
    tan_half_fov = np.array(
        [max(f.width / (2 * f.K[0, 0]), f.height / (2 * f.K[1, 1])) for f in train]
    )
    distances = np.linalg.norm(centers - focus, axis=1)
    half = float(np.median(distances * tan_half_fov))
    if half <= _DEGENERATE:
        half = 1.0
    rng = np.random.default_rng(seed)
    points = focus + rng.uniform(-half, half, size=(RANDOM_INIT_POINTS, 3))
    colors = rng.integers(0, 256, size=(RANDOM_INIT_POINTS, 3), dtype=np.uint8)
    return points, colors


def _axes_focus(centers: np.ndarray, forwards: np.ndarray) -> np.ndarray | None:
    """Least-squares meeting point of the optical axes, or None if they are near parallel
    or it lies behind most cameras."""
    projectors = np.eye(3) - forwards[:, :, None] * forwards[:, None, :]
    a = projectors.sum(axis=0)
    b = np.einsum("nij,nj->i", projectors, centers)
    if np.linalg.cond(a) > 1e6:
        return None
    focus = np.linalg.solve(a, b)
    in_front = np.einsum("ni,ni->n", focus - centers, forwards) > 0
    return focus if in_front.mean() > 0.5 else None
