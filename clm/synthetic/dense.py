"""``clm-synth --dense N``: a dense initial model of a generated scene, N Gaussians on its
surfaces, streamed to a 3DGS PLY a chunk at a time (150 million rows are about 10 GB), so
neither the host nor the GPU ever holds the whole model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from clm.errors import ClmError
from clm.model.ply import property_names, write_ply_stream
from clm.synthetic.geometry import load_geometry
from clm.synthetic.surface import surface_params

ROW_BYTES = 4 * len(property_names(0))  # SH degree 0: 17 float32


def dense_path(scene_dir: Path, n: int) -> Path:
    return Path(scene_dir) / f"dense_{n}.ply"


def check_dense(scene_dir: Path, n: int) -> None:
    """Refuse, as one line, a count that is not positive or whose file the disk cannot hold:
    before rendering, not after hours of it."""
    if n < 1:
        raise ClmError(f"--dense must be at least 1 Gaussian, got {n}")
    folder = Path(scene_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    need, free = n * ROW_BYTES + 4096, shutil.disk_usage(folder).free
    if need > free:
        raise ClmError(
            f"--dense {n} needs {need / 1e9:.1f} GB in {scene_dir} but only "
            f"{free / 1e9:.1f} GB are free"
        )


def write_dense_ply(
    scene_dir: Path,
    n: int,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[Path, int]:
    """Write :func:`dense_path` for the scene in ``scene_dir`` (from its ``synthetic.json``);
    return the path and the rows written.

    The Gaussians are those of :func:`clm.synthetic.surface.surface_params` at SH degree 0, in
    the world frame of the scene's COLMAP model.
    """
    geometry = load_geometry(scene_dir)
    check_dense(scene_dir, n)
    path = dense_path(scene_dir, n)
    chunks = surface_params(geometry, n, seed=seed, device=device)
    with tqdm(
        total=n, desc="clm-synth dense", unit="G", unit_scale=True, disable=not progress
    ) as bar:

        def counted():
            for chunk in chunks:
                yield chunk
                bar.update(len(chunk["means"]))

        written, _ = write_ply_stream(path, 0, n, counted())
    return path, written
