"""Between the training frame and the user's: PLY export and import, chunk by chunk.

Training works in a normalised frame (``x_train = s·(x_world - c)``, see
:class:`clm.data.types.Similarity`). A uniform scale and a translation leave rotations and
view-dependent colour unchanged, so only positions and log-scales need converting. Models move
in chunks (:class:`clm.engine.base.RowSource`), so a PLY of a hundred million splats is never
in memory whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clm.data.types import Similarity
from clm.engine.base import RowChunk, RowSource
from clm.errors import ClmError
from clm.model.ply import open_ply, write_ply_stream
from clm.model.spec import GaussianSpec, pack_rows, unpack_rows
from clm.offload.lazy_rows import CaughtUpCopies, SkipTables
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.train.checkpoint import LAST_COLUMN, MOMENT_KINDS, Checkpoint

log = logging.getLogger(__name__)

PLAN_SAMPLE_ROWS = 1 << 20  # rows read ahead of loading a model, to plan its GPU memory


def params_to_world(params: Mapping[str, Tensor], to_train: Similarity) -> dict[str, np.ndarray]:
    out = {k: v.detach().cpu().float().numpy() for k, v in params.items()}
    out["means"] = to_train.to_world(out["means"].astype(np.float64)).astype(np.float32)
    out["scales"] = out["scales"] - np.float32(math.log(to_train.scale))
    return out


def world_to_params(
    splats: Mapping[str, np.ndarray], to_train: Similarity, spec: GaussianSpec
) -> dict[str, Tensor]:
    """PLY values as raw parameters in the training frame, fitted to the spec's SH degree."""
    params = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in splats.items()}
    means = to_train.to_train(np.asarray(splats["means"], dtype=np.float64))
    params["means"] = torch.as_tensor(means.astype(np.float32))
    params["scales"] = params["scales"] + math.log(to_train.scale)
    bands = spec["shN"].shape[0]
    rest = params["shN"]
    if rest.shape[1] != bands:
        fitted = torch.zeros(rest.shape[0], bands, 3)
        keep = min(bands, rest.shape[1])
        fitted[:, :keep] = rest[:, :keep]
        params["shN"] = fitted
    return params


def export_ply(
    path: Path, chunks: Iterable[Mapping[str, Tensor]], count: int, to_train: Similarity
) -> tuple[int, int]:
    """Write parameter chunks (training frame, ``count`` rows in all) as the INRIA PLY in the
    scene's own frame; returns (written, dropped non-finite)."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise ClmError(f"{path}: the model has no Gaussians to export")

    def world() -> Iterator[dict[str, np.ndarray]]:
        yield params_to_world(first, to_train)
        for chunk in it:
            yield params_to_world(chunk, to_train)

    return write_ply_stream(path, first["shN"].shape[1], count, world())


def ply_source(path: Path, to_train: Similarity, spec: GaussianSpec) -> RowSource:
    """A PLY's splats as raw parameters in the training frame, streamed from disk.

    A row holding NaN or infinity is refused where it is met (the planning sample first): the
    row count is promised before the rows are read, so such rows cannot be dropped on the way.
    """
    ply = open_ply(path)
    if ply.count == 0:
        raise ClmError(f"{path}: the PLY holds no Gaussians")
    bands = spec["shN"].shape[0]
    if ply.num_rest != bands:
        log.info("%s has %d SH bands beyond degree 0; the model has %d", path, ply.num_rest, bands)

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

    def chunks() -> Iterator[RowChunk]:
        start = 0
        for chunk in ply.chunks():
            yield RowChunk(world_to_params(finite(chunk, start), to_train, spec))
            start += len(chunk["means"])

    return RowSource(
        ply.count,
        chunks(),
        sample=lambda: world_to_params(finite(ply.sample(PLAN_SAMPLE_ROWS), None), to_train, spec),
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
