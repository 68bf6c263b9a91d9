"""Presets and the scene writer: render every view, write images, the COLMAP model and
``synthetic.json`` (the parameters and geometry, so dense points can be sampled again later)."""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clm.data.colmap import write_model
from clm.devices import resolve_device
from clm.errors import ClmError
from clm.synthetic.cameras import AERIAL, Intrinsics, make_views
from clm.synthetic.geometry import CityParams, build_city
from clm.synthetic.points import ViewSamples, build_sparse_model, sample_view
from clm.synthetic.raycast import RayCaster
from clm.synthetic.render_view import render_view

JPEG_FROM_HEIGHT = 720  # PNG below, JPEG quality 95 from here up


@dataclass(frozen=True)
class Preset:
    """What ``--size`` selects; ``samples`` is the anti-aliasing rays per pixel side.

    ``survey`` lists the altitudes of an oblique survey of the whole city (with street views
    of the facades), in place of orbits and flight lines over a few blocks at a time.
    """

    images: int
    width: int
    height: int
    points: int
    samples: int
    hfov: float
    aerial_fraction: float
    city: CityParams
    survey: tuple[float, ...] = ()


PRESETS: dict[str, Preset] = {
    # CPU end-to-end test and README demo: four buildings, coarse facades for 96 px images.
    "tiny": Preset(
        40,
        96,
        72,
        3000,
        2,
        60.0,
        0.6,
        CityParams(
            blocks=(2, 2),
            max_lots=1,
            max_height=24.0,
            downtown_height=14.0,
            park_fraction=0.0,
            street_trees=0.15,
            texture_scale=1.3,
        ),
    ),
    "small": Preset(
        100,
        320,
        240,
        10_000,
        2,
        60.0,
        0.6,
        CityParams(
            blocks=(3, 3), max_lots=2, max_height=36.0, downtown_height=18.0, street_trees=0.3
        ),
    ),
    "medium": Preset(
        300,
        1920,
        1080,
        100_000,
        2,
        70.0,
        0.6,
        CityParams(
            blocks=(4, 4), max_lots=3, max_height=60.0, downtown_height=26.0, street_trees=0.5
        ),
    ),
    "city": Preset(
        2000,
        1920,
        1080,
        500_000,
        1,
        70.0,
        0.6,
        CityParams(
            blocks=(14, 14), max_lots=3, max_height=120.0, downtown_height=42.0, street_trees=0.5
        ),
    ),
    # A 2 km x 2 km city (1600 blocks, ~5100 buildings in ~7600 boxes, ~10500 trees) surveyed like
    # MatrixCity: each aerial view sees about 1-5% of the surfaces, a facade view far less.
    "metro": Preset(
        3600,
        1920,
        1080,
        1_000_000,
        1,
        60.0,
        2 / 3,
        CityParams(
            blocks=(40, 40), max_lots=3, max_height=120.0, downtown_height=42.0, street_trees=0.5
        ),
        survey=(250.0, 320.0, 390.0),
    ),
}


def generate_scene(
    out_dir: Path,
    size: str = "tiny",
    *,
    images: int | None = None,
    width: int | None = None,
    height: int | None = None,
    points: int | None = None,
    seed: int = 0,
    device: str | None = None,
    downscales: Sequence[int] = (),
    progress: bool = True,
) -> Path:
    """Generate a scene in COLMAP layout under ``out_dir`` and return ``out_dir``.

    The same arguments give the same scene (on one device type: CPU and CUDA round floats
    differently, so a pixel may differ by one level).
    """
    preset = _resolve(size, images, width, height, points, seed, downscales)
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    _prepare(out_dir, downscales)
    with _one_cpu_thread(dev):
        _generate(out_dir, size, preset, seed, dev, downscales, progress)
    return out_dir


def _generate(
    out_dir: Path,
    size: str,
    preset: Preset,
    seed: int,
    dev: torch.device,
    downscales: Sequence[int],
    progress: bool,
) -> None:
    """Lay out the city, render the views (writing images as they come), then the model."""
    geometry = build_city(preset.city, seed)
    intr = Intrinsics.from_fov(preset.width, preset.height, preset.hfov)
    ext = "jpg" if preset.height >= JPEG_FROM_HEIGHT else "png"
    rng = np.random.default_rng([seed, 0xCA3])
    views = make_views(geometry, preset.images, preset.aerial_fraction, ext, rng, preset.survey)
    caster = RayCaster(geometry, dev)

    quotas = np.full(len(views), preset.points // len(views))
    quotas[: preset.points % len(views)] += 1
    samples: list[ViewSamples] = []
    shortfall = 0
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for view, quota in zip(
            tqdm(views, desc=f"clm-synth {size}", unit="img", disable=not progress),
            quotas,
            strict=True,
        ):
            rgb = render_view(caster, view.world_to_camera, intr, preset.samples)
            image = (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
            sampled = sample_view(caster, view, intr, image, int(quota) + shortfall, rng)
            shortfall += int(quota) - len(sampled.uv)
            samples.append(sampled)
            pending.append(pool.submit(_write_image, out_dir, view.name, image, downscales))
            while len(pending) > 2 * workers:
                pending.popleft().result()
        for job in pending:
            job.result()

    model = build_sparse_model(caster, views, intr, samples, seed)
    write_model(out_dir / "sparse" / "0", model)
    meta = {
        "format": "clm-synthetic",
        "version": 1,
        "generator": {
            "size": size,
            "seed": seed,
            "images": preset.images,
            "aerial_images": sum(v.kind == AERIAL for v in views),
            "width": preset.width,
            "height": preset.height,
            "points": len(model.points),
            "samples": preset.samples,
            "hfov": preset.hfov,
            "downscales": list(downscales),
            "city": asdict(preset.city),
            **({"survey": list(preset.survey)} if preset.survey else {}),
        },
        "geometry": geometry.to_json(),
    }
    (out_dir / "synthetic.json").write_text(json.dumps(meta))


@contextmanager
def _one_cpu_thread(dev: torch.device) -> Iterator[None]:
    """Ray-cast on one CPU thread: the tensors of a tile batch are small, and on a loaded
    2-core machine torch's intra-op threads made tiny 15x slower, not faster."""
    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve(
    size: str,
    images: int | None,
    width: int | None,
    height: int | None,
    points: int | None,
    seed: int,
    downscales: Sequence[int],
) -> Preset:
    """The preset with the user's overrides, or a ClmError naming the bad option."""
    if size not in PRESETS:
        raise ClmError(f"unknown --size {size!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[size]
    if images is not None and images < 1:
        raise ClmError(f"--images must be at least 1, got {images}")
    if not 0 <= seed < 2**63:
        raise ClmError(f"--seed must be a non-negative integer below 2**63, got {seed}")
    if points is not None and points < 0:
        raise ClmError(f"--points must not be negative, got {points}")
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and not 16 <= value <= 16384:
            raise ClmError(f"{name} must be between 16 and 16384 pixels, got {value}")
    if any(f < 2 for f in downscales):
        raise ClmError(
            f"--downscales factors must be integers of at least 2, got {list(downscales)}"
        )
    if width is not None and height is None:
        height = max(round(width * p.height / p.width), 16)
    if height is not None and width is None:
        width = max(round(height * p.width / p.height), 16)
    return replace(
        p,
        images=images if images is not None else p.images,
        width=width or p.width,
        height=height or p.height,
        points=points if points is not None else p.points,
    )


def _prepare(out_dir: Path, downscales: Sequence[int]) -> None:
    """Create the output folders, failing early (as a ClmError) if they cannot be written.

    Regenerating into a scene of ours first drops its images, so no stale images_F/ of an
    earlier run lingers beside the new model.
    """
    try:
        if (out_dir / "synthetic.json").is_file():
            (out_dir / "synthetic.json").unlink()
            for folder in out_dir.glob("images*"):
                if folder.is_dir():
                    shutil.rmtree(folder)
        for folder in ["images", *(f"images_{f}" for f in downscales), "sparse/0"]:
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".clm-synth-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ClmError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None


def _write_image(out_dir: Path, name: str, pixels: np.ndarray, downscales: Sequence[int]) -> None:
    """Encode an image and its downscaled copies (on a worker thread: Pillow drops the GIL)."""
    image = Image.fromarray(pixels)
    options = {"quality": 95} if name.endswith(".jpg") else {"compress_level": 6}
    image.save(out_dir / "images" / name, **options)
    for f in downscales:
        size = (max(round(image.width / f), 1), max(round(image.height / f), 1))
        small = image.resize(size, Image.Resampling.BOX)
        small.save(out_dir / f"images_{f}" / name, **options)
