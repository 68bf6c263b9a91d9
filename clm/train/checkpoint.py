"""Checkpoints that scale to a hundred million Gaussians and survive crashes.

A checkpoint is one file, written block by block straight from the engine (the host store and
the GPU rows), so saving never holds a second copy of the model; reading streams the blocks back
the same way. Layout::

    MAGIC | block 0 | block 1 | ... | meta (torch.save) | meta offset, meta length (u64) | MAGIC

A block holds a run of rows of every per-row column (``param/means``, ``exp_avg/shN``, ...,
``density/grad2d``) as raw little-endian arrays; the meta holds the rest of the training state
and where each block's columns lie. A column of ``[rows, K, C]`` (the higher SH bands) is stored
without its trailing all-zero bands, which is exact and shrinks checkpoints taken before every
band is active. The file is written atomically (see :mod:`clm.files`): the previous checkpoints
stay intact until the new one is complete, and only then are the oldest deleted.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from clm.engine.base import RowChunk
from clm.errors import ClmError
from clm.files import atomic_write, reason
from clm.model.spec import GaussianSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MAGIC = b"CLMCKPT2"
_TRAILER = struct.Struct("<QQ")
_NAME = re.compile(r"^step_(\d+)\.ckpt$")
MOMENT_KINDS = ("param", "exp_avg", "exp_avg_sq")
LAST_COLUMN = "lazy/last"  # with lazy Adam: the step each row's non-key attributes are at


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(output)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def state_columns(
    spec: GaussianSpec, extra: dict[str, tuple[int, ...]] | None = None, lazy: bool = False
) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the columns a checkpoint of ``spec`` holds: ``<kind>/<attribute>`` for
    the parameters and both Adam moments, each row's step with ``lazy`` rows, then ``extra``
    (other per-row state)."""
    columns = {f"{kind}/{a.name}": tuple(a.shape) for kind in MOMENT_KINDS for a in spec}
    if lazy:
        columns[LAST_COLUMN] = ()
    return {**columns, **(extra or {})}


def state_blocks(
    chunks: Iterable[RowChunk], extra: Callable[[int, int], dict[str, Tensor]] | None = None
) -> Iterator[dict[str, Tensor]]:
    """An engine's :meth:`~clm.engine.base.Engine.state_chunks` as checkpoint blocks, with
    ``extra(start, stop)`` (columns named as in :func:`state_columns`) added to each."""
    start = 0
    for chunk in chunks:
        stop = start + len(chunk)
        kinds = zip(MOMENT_KINDS, (chunk.params, *chunk.moments()), strict=True)
        block = {f"{kind}/{name}": t for kind, values in kinds for name, t in values.items()}
        if chunk.last is not None:
            block[LAST_COLUMN] = chunk.last
        if extra is not None:
            block.update(extra(start, stop))
        yield block
        start = stop


def _trimmed(values: Tensor) -> np.ndarray:
    """A column block as a fresh contiguous numpy array (its own memory: the writing thread
    may still hold it when the producer reuses its buffer), without trailing all-zero bands
    (dim 1 of 3-d blocks)."""
    array = values.detach().cpu().contiguous().numpy()
    if array.ndim == 3 and array.shape[1]:
        used = np.flatnonzero(array.reshape(len(array), -1).any(axis=0))
        bands = int(used[-1]) // array.shape[2] + 1 if used.size else 0
        array = array[:, :bands]
    return np.array(array, order="C", copy=True)


class _Writer:
    """Writes byte buffers to a stream on a background thread, so the next block is prepared
    while the last one is written; :meth:`put` returns where its bytes start. An error of the
    writing thread (a full disk) is raised again on the caller's thread."""

    def __init__(self, stream: BinaryIO, depth: int = 4) -> None:
        self.stream = stream
        self.size = 0
        self._queue: queue.Queue[memoryview | bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clm-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.stream.write(data)
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def put(self, data: memoryview | bytes) -> int:
        if self._error is not None:
            raise self._error
        offset = self.size
        self._queue.put(data)
        self.size += len(memoryview(data).cast("B"))
        return offset

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def _bytes(array: np.ndarray) -> memoryview:
    """A contiguous array's bytes, without a copy (also for an empty array)."""
    return memoryview(array.reshape(-1).view(np.uint8))


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    bytes: int
    seconds: float


def save_checkpoint(
    output: Path,
    step: int,
    meta: dict[str, Any],
    columns: dict[str, tuple[int, ...]],
    blocks: Iterable[dict[str, Tensor]],
    keep: int = 2,
    rows: int | None = None,
) -> SavedCheckpoint:
    """Write ``blocks`` (per-row columns, consecutive rows) and ``meta`` as checkpoint ``step``,
    then delete all but the newest ``keep`` checkpoints. ``columns`` gives each column's
    per-row shape, so a reader can restore trimmed bands; ``rows``, when known, sizes the
    message of a full disk."""
    folder = checkpoint_dir(output)
    path = folder / f"step_{step:07d}.ckpt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClmError(f"{folder}: cannot create the checkpoint folder ({reason(exc)})") from None
    start = time.perf_counter()
    size = 0

    def write(stream: BinaryIO) -> None:
        nonlocal size
        with _Writer(stream) as out:
            out.put(MAGIC)
            index, count = [], 0
            for block in blocks:
                entry: dict[str, Any] = {}
                for name, values in block.items():
                    array = _trimmed(values)
                    entry[name] = (out.put(_bytes(array)), array.shape, str(array.dtype))
                rows = len(next(iter(block.values()))) if block else 0
                index.append((rows, entry))
                count += rows
            buffer = io.BytesIO()
            record = {"format": FORMAT_VERSION, "step": step, "count": count, **meta}
            torch.save({**record, "columns": columns, "blocks": index}, buffer)
            offset = out.put(buffer.getbuffer())
            out.put(_TRAILER.pack(offset, buffer.tell()))
            out.put(MAGIC)
            size = out.size

    per_row = sum(4 * math.prod(shape) for shape in columns.values())
    atomic_write(path, write, needed=None if rows is None else rows * per_row)
    for old in list_checkpoints(output)[:-keep]:
        old.unlink(missing_ok=True)
    return SavedCheckpoint(path, size, time.perf_counter() - start)


class Checkpoint:
    """An opened checkpoint: its meta at once, its rows block by block on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(len(MAGIC))
                fh.seek(-(_TRAILER.size + len(MAGIC)), 2)
                offset, length = _TRAILER.unpack(fh.read(_TRAILER.size))
                tail = fh.read(len(MAGIC))
                if head != MAGIC or tail != MAGIC:
                    raise ValueError("no clm checkpoint header or trailer")
                fh.seek(offset)
                meta = torch.load(io.BytesIO(fh.read(length)), weights_only=False)
        except FileNotFoundError:
            raise ClmError(f"{self.path}: checkpoint not found") from None
        except Exception as exc:  # truncated, damaged or foreign: one line, whatever the cause
            raise ClmError(
                f"{self.path}: not a readable clm checkpoint (format {FORMAT_VERSION}; "
                f"{reason(exc)})"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise ClmError(f"{self.path}: not a clm checkpoint (format {FORMAT_VERSION})")
        self.meta: dict[str, Any] = meta
        self.step = int(meta["step"])
        self.count = int(meta["count"])
        self.columns: dict[str, tuple[int, ...]] = meta["columns"]

    def blocks(self, names: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
        """The columns ``names`` (all when None) of each block, trimmed bands restored."""
        wanted = list(self.columns) if names is None else list(names)
        missing = [n for n in wanted if n not in self.columns]
        if missing:
            raise ClmError(f"{self.path}: checkpoint has no column {', '.join(missing)}")
        try:
            with open(self.path, "rb") as fh:
                for rows, entry in self.meta["blocks"]:
                    yield {n: self._read(fh, rows, n, entry[n]) for n in wanted}
        except OSError as exc:
            raise ClmError(f"{self.path}: cannot read checkpoint ({reason(exc)})") from None

    def sample(self, names: Sequence[str], rows: int) -> dict[str, Tensor]:
        """About ``rows`` rows of the columns ``names``: the first rows of every block, so the
        sample spans the whole model while reading little of it."""
        blocks = self.meta["blocks"]
        per_block = max(1, -(-rows // max(len(blocks), 1)))
        parts: dict[str, list[Tensor]] = {n: [] for n in names}
        try:
            with open(self.path, "rb") as fh:
                for block_rows, entry in blocks:
                    take = min(per_block, block_rows)
                    for n in names:
                        offset, shape, dtype = entry[n]
                        head = (take, *shape[1:])
                        parts[n].append(self._read(fh, take, n, (offset, head, dtype)))
        except OSError as exc:
            raise ClmError(f"{self.path}: cannot read checkpoint ({reason(exc)})") from None
        return {n: torch.cat(p) for n, p in parts.items()}

    def _read(self, fh: BinaryIO, rows: int, name: str, where: tuple) -> Tensor:
        offset, shape, dtype = where
        array = np.empty(shape, dtype=dtype)
        fh.seek(offset)
        if fh.readinto(_bytes(array)) != array.nbytes:
            raise ClmError(f"{self.path}: checkpoint is truncated")
        full = (rows, *self.columns[name])
        if tuple(shape) == full:
            return torch.from_numpy(array)
        out = torch.zeros(full, dtype=torch.from_numpy(array).dtype)
        out[:, : shape[1]] = torch.from_numpy(array)
        return out


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a checkpoint file, or the newest readable checkpoint of a run folder: an unreadable
    newest one (a crash mid-copy, a damaged disk) falls back to the one before, with a warning."""
    if not path.is_dir():
        if not path.exists():
            raise ClmError(f"{path}: no such checkpoint or run folder")
        return Checkpoint(path)
    found = list_checkpoints(path)
    if not found:
        raise ClmError(f"{path}: no checkpoints in {checkpoint_dir(path)}")
    for candidate in reversed(found[1:]):
        try:
            return Checkpoint(candidate)
        except ClmError as exc:
            log.warning("%s; falling back to the checkpoint before it", exc)
    return Checkpoint(found[0])
