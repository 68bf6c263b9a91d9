"""A method's rows to and from PLY files, streamed: a PLY of a hundred million splats is never in
memory whole (:class:`clm.engine.base.RowSource` chunks in, chunks of splats out). What a
chunk's attributes are, and how they convert between the training frame and the scene's, is
the method's (:meth:`clm.methods.base.Method.to_world`, :meth:`~Method.from_world`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from torch import Tensor

from clm.engine.base import RowChunk, RowSource
from clm.errors import ClmError
from clm.model.ply import open_ply, write_ply_stream

PLAN_SAMPLE_ROWS = 1 << 20  # rows read ahead of loading a model, to plan its GPU memory


def export_ply(
    path: Path, chunks: Iterable[Mapping[str, np.ndarray]], count: int
) -> tuple[int, int]:
    """Write chunks of splats already in the scene's frame (``count`` rows in all) as a PLY;
    returns (written, dropped non-finite). The SH bands and the scale count follow the first
    chunk."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise ClmError(f"{path}: the model has no Gaussians to export")

    def world() -> Iterator[Mapping[str, np.ndarray]]:
        yield first
        yield from it

    return write_ply_stream(
        path, first["shN"].shape[1], count, world(), num_scales=first["scales"].shape[1]
    )


def ply_source(
    path: Path, from_world: Callable[[dict[str, np.ndarray]], dict[str, Tensor]]
) -> RowSource:
    """A PLY's splats as raw parameters in the training frame (``from_world`` converts a chunk
    of them, see :meth:`clm.methods.base.Method.from_world`), streamed from disk.

    A row holding NaN or infinity is refused where it is met (the planning sample first): the
    row count is promised before the rows are read, so such rows cannot be dropped on the way.
    """
    ply = open_ply(path)
    if ply.count == 0:
        raise ClmError(f"{path}: the PLY holds no Gaussians")

    def finite(splats: dict[str, np.ndarray], first_row: int | None) -> dict[str, np.ndarray]:
        """``splats`` if every value is finite; ``first_row`` None: they are the sample."""
        rows = np.stack([np.isfinite(v.reshape(len(v), -1)).all(1) for v in splats.values()])
        bad = np.flatnonzero(~rows.all(0))
        if len(bad):
            what = (
                f"{len(bad)} of {rows.shape[1]} sampled Gaussians hold"
                if first_row is None
                else f"Gaussian {first_row + bad[0]} holds"
            )
            raise ClmError(f"{path}: {what} NaN or infinite values; remove such rows first")
        return splats

    def convert(splats: dict[str, np.ndarray]) -> dict[str, Tensor]:
        try:
            return from_world(splats)
        except ClmError as exc:
            raise ClmError(f"{path}: {exc}") from None

    def chunks() -> Iterator[RowChunk]:
        start = 0
        for chunk in ply.chunks():
            yield RowChunk(convert(finite(chunk, start)))
            start += len(chunk["means"])

    return RowSource(
        ply.count,
        chunks(),
        sample=lambda: convert(finite(ply.sample(PLAN_SAMPLE_ROWS), None)),
    )
