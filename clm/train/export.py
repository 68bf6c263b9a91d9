"""Models streamed in and out: PLY export and import, checkpoints read by another engine.

Models move in chunks (:class:`clm.engine.base.RowSource`), so a PLY of a hundred million
splats is never in memory whole. What a chunk means (its attributes, and how they convert
between the training frame and the scene's) is the method's (:class:`clm.methods.base.Method`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clm.engine.base import RowChunk, RowSource
from clm.errors import ClmError
from clm.model.ply import open_ply, write_ply_stream
from clm.model.spec import GaussianSpec, pack_rows, unpack_rows
from clm.offload.lazy_rows import CaughtUpCopies, SkipTables
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.train.checkpoint import LAST_COLUMN, MOMENT_KINDS, Checkpoint

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


def checkpoint_source(
    ckpt: Checkpoint, spec: GaussianSpec, moments: bool = True, lazy: bool = False
) -> RowSource:
    """A checkpoint's rows for ``spec`` (whose SH bands may be fewer than the run's: the rest are
    cut off), with both Adam moments unless ``moments`` is False (rendering needs none).

    A checkpoint of lazily updated rows holds them as they were, with each row's step: with
    ``lazy`` they come so (to resume the same engine exactly); otherwise they are caught up on
    the way, with the run's learning rates and Adam settings from the checkpoint.
    """
    stored_lazy = LAST_COLUMN in ckpt.columns
    catch_up = _catch_up(ckpt, spec) if stored_lazy and not lazy else None
    read_moments = moments or catch_up is not None
    kinds = MOMENT_KINDS if read_moments else MOMENT_KINDS[:1]
    names = [f"{kind}/{a.name}" for kind in kinds for a in spec]
    if stored_lazy:
        names.append(LAST_COLUMN)

    def fit(values: Tensor, shape: tuple[int, ...]) -> Tensor:
        return values[:, : shape[0]] if values.shape[1:] != shape else values

    def chunks() -> Iterator[RowChunk]:
        for block in ckpt.blocks(names):
            parts = [
                {a.name: fit(block[f"{kind}/{a.name}"], a.shape) for a in spec} for kind in kinds
            ]
            last = block.get(LAST_COLUMN)
            if catch_up is not None:
                catch_up(*parts, last)
                last = None
            yield RowChunk(*(parts if moments else parts[:1]), last=last)

    def sample() -> dict[str, Tensor]:
        names = [f"param/{a.name}" for a in spec]
        return {n.split("/", 1)[1]: t for n, t in ckpt.sample(names, PLAN_SAMPLE_ROWS).items()}

    return RowSource(ckpt.count, chunks(), ckpt.step if moments else 0, sample=sample)


def _catch_up(ckpt: Checkpoint, spec: GaussianSpec):
    """A function that brings a block's lazily updated attributes up to the checkpoint's step in
    place, with the skip tables of the run's learning rates (rebuilt from the checkpoint's
    record)."""
    record = ckpt.meta.get("optimizer")
    if record is None:
        raise ClmError(f"{ckpt.path}: the checkpoint does not record its learning rates")
    lrs = LearningRates(spec, record["total_steps"], record["extent"], record["batch_size"])
    config = AdamConfig(tuple(record["betas"]), record["eps"])
    tables = SkipTables(spec.host, lrs, config, torch.device("cpu"))
    tables.advance_to(ckpt.step)
    segments = tables.segments(ckpt.step)
    copies = CaughtUpCopies(tables.width, config)

    def catch_up(*state_and_last) -> None:
        *state, last = state_and_last
        packed = [
            pack_rows({a.name: part[a.name] for a in spec.host}, tables.layout) for part in state
        ]
        caught = copies(*packed, last, ckpt.step, segments)
        for part, values in zip(state, caught, strict=True):
            part.update({n: t.clone() for n, t in unpack_rows(values, tables.layout).items()})

    return catch_up
