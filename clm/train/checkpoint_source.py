"""A checkpoint's rows as a stream for an engine: as they were (to resume the same engine
exactly), or caught up to the checkpoint's step (for another engine, rendering or export).

Rows move in chunks (:class:`clm.engine.base.RowSource`), so a checkpoint of a hundred million
rows is never in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from clm.engine.base import RowChunk, RowSource
from clm.errors import ClmError
from clm.methods.ply_rows import PLAN_SAMPLE_ROWS
from clm.model.spec import GaussianSpec, pack_rows, unpack_rows
from clm.offload.lazy_rows import CaughtUpCopies, SkipTables
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.train.checkpoint import LAST_COLUMN, MOMENT_KINDS, Checkpoint


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


def stored_key(ckpt: Checkpoint, spec: GaussianSpec) -> list[str] | None:
    """The attributes of ``spec`` that the run writing ``ckpt`` kept on the GPU, current at the
    checkpoint's step, where its other rows are stored as they were (None: every row is
    current). An engine resuming those rows as they were must keep the same ones there."""
    if LAST_COLUMN not in ckpt.columns:
        return None
    lazy = (ckpt.meta.get("optimizer") or {}).get("lazy_attributes")
    if lazy is None:  # written before the record: the spec's own key attributes
        return [a.name for a in spec.key]
    return [name for name in spec.names if name not in lazy]


def _catch_up(ckpt: Checkpoint, spec: GaussianSpec):
    """A function that brings a block's lazily updated attributes up to the checkpoint's step in
    place, with the skip tables of the run's learning rates (rebuilt from the checkpoint's
    record)."""
    record = ckpt.meta.get("optimizer")
    if record is None:
        raise ClmError(f"{ckpt.path}: the checkpoint does not record its learning rates")
    lrs = LearningRates(spec, record["total_steps"], record["extent"], record["batch_size"])
    config = AdamConfig(tuple(record["betas"]), record["eps"])
    key = stored_key(ckpt, spec)
    lazy = spec.with_key(key or ()).host
    tables = SkipTables(lazy, lrs, config, torch.device("cpu"))
    tables.advance_to(ckpt.step)
    segments = tables.segments(ckpt.step)
    copies = CaughtUpCopies(tables.width, config)

    def catch_up(*state_and_last) -> None:
        *state, last = state_and_last
        packed = [pack_rows({a.name: part[a.name] for a in lazy}, tables.layout) for part in state]
        caught = copies(*packed, last, ckpt.step, segments)
        for part, values in zip(state, caught, strict=True):
            part.update({n: t.clone() for n, t in unpack_rows(values, tables.layout).items()})

    return catch_up
