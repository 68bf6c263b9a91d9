"""What every engine offers the trainer: one optimiser step over a batch of views, rendering for
evaluation, the row operations density control needs, and a dense snapshot for checkpoints.

Engines differ only in where rows live and how they move; they share the renderer, the loss and
Adam's arithmetic, so switching ``--offload`` changes speed and memory, not the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from clm.devices import with_index
from clm.model.spec import GaussianSpec
from clm.model.table import Compaction
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.render.base import RenderFn, RenderOutput, View

# loss_fn(position in the batch as given, render) -> scalar loss, already divided by the batch size
LossFn = Callable[[int, RenderOutput], Tensor]
# A box of pixels (x0, y0, x1, y1): columns x0 to x1 - 1, rows y0 to y1 - 1.
Box = tuple[int, int, int, int]


@runtime_checkable
class LocalLoss(Protocol):
    """A :data:`LossFn` that is a mean over the image's pixels of terms that each look at
    most ``reach`` pixels away (L1 and SSIM do). The loss of a crop then gives the pixels
    ``reach`` inside it their whole-image gradients, so an engine may train a view in pieces
    in one pass, from the pieces' own renders."""

    reach: int

    def __call__(self, i: int, out: RenderOutput) -> Tensor: ...

    def crop(self, i: int, out: RenderOutput, box: Box) -> Tensor:
        """The loss of view ``i``'s pixels ``box``, which ``out`` holds, weighted by their
        share of the image (and divided by the batch size, as the loss is); not logged."""
        ...


# observe(global row ids of out.ids, render, view), called after each backward
ObserveFn = Callable[[Tensor, RenderOutput, View], None]


@dataclass
class Snapshot:
    """Parameters and Adam moments of every row, on the CPU, as dense Adam would have them."""

    params: dict[str, Tensor]
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    step: int


# Rows per chunk when a whole model streams in or out (checkpoints, export, loading).
STREAM_ROWS = 1 << 16


@dataclass
class RowChunk:
    """Consecutive rows of every attribute, on the CPU; moments of ``None`` mean zeros (a model
    that has not been trained, such as an initial PLY). ``last``: with lazy Adam, the step each
    row's non-key attributes are up to date at (None: all at the source's step)."""

    params: dict[str, Tensor]
    exp_avg: dict[str, Tensor] | None = None
    exp_avg_sq: dict[str, Tensor] | None = None
    last: Tensor | None = None

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def moments(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both moments, zeros where the chunk has none."""
        zeros = {n: torch.zeros_like(t) for n, t in self.params.items()}
        return self.exp_avg or zeros, self.exp_avg_sq or zeros


@dataclass
class RowSource:
    """A whole model as a stream of chunks, so a hundred million rows never sit in RAM twice:
    ``count`` rows in all, in :class:`RowChunk` pieces, with moments as of optimiser step
    ``step``."""

    count: int
    chunks: Iterable[RowChunk]
    step: int = 0
    # Rows spread over the whole model (parameters only), for planning before loading.
    sample: Callable[[], dict[str, Tensor]] | None = None

    @classmethod
    def of(cls, params: Mapping[str, Tensor], step: int = 0) -> RowSource:
        """One chunk holding ``params`` (a model small enough to be in memory already)."""
        params = dict(params)
        count = next(iter(params.values())).shape[0]
        return cls(count, [RowChunk(params)], step, sample=lambda: params)


@dataclass
class StepStats:
    """Figures of one step for the progress bar and benchmarks (engines fill what applies)."""

    visible_rows: int = 0
    host_rows: int = 0  # of those, rows the host path served (the rest were resident)
    read_rows: int = 0  # of those, rows whose colours a render read (summed over groups)
    bytes_to_gpu: int = 0
    bytes_to_host: int = 0  # gradients queued (on CUDA, rows without any stay on the GPU)
    cache_hits: int = 0
    cache_lookups: int = 0


class Engine(ABC):
    """Owns the Gaussians and their optimiser state; see the module docstring."""

    # Whether rows take their skipped Adam steps lazily: checkpoints then keep rows as they are,
    # with each row's step (``state_chunks(lazy=True)``), so saving changes nothing.
    lazy = False

    def __init__(
        self,
        spec: GaussianSpec,
        render_fn: RenderFn,
        lrs: LearningRates,
        adam: AdamConfig,
        device: torch.device,
    ) -> None:
        self.spec = spec
        self.render_fn = render_fn
        self.lrs = lrs
        self.adam = adam
        self.device = with_index(device)
        self.step = 0  # last optimiser step applied
        self.max_gaussians: int | None = None  # what the memory budgets allow
        self.last_stats = StepStats()

    @property
    @abstractmethod
    def num_gaussians(self) -> int: ...

    @abstractmethod
    def key_param(self, name: str) -> Tensor:
        """Live rows of a key attribute on the compute device, up to date with the last step."""

    @abstractmethod
    def attribute_rows(self, name: str, ids: Tensor) -> Tensor:
        """Values of attribute ``name`` for rows ``ids``, on the compute device, up to date with
        the last step (key attributes straight from the device, others from their rows)."""

    @abstractmethod
    def train_step(
        self,
        views: Sequence[View],
        loss_fn: LossFn,
        observe: ObserveFn,
        sh_degree: int,
        background: Tensor,
    ) -> None:
        """Render each view, backpropagate its loss, then apply optimiser step ``self.step + 1``."""

    @abstractmethod
    def render(self, view: View, sh_degree: int, background: Tensor) -> RenderOutput:
        """Render without gradients (evaluation, previews)."""

    @abstractmethod
    def append(self, src: Tensor, overrides: Mapping[str, Tensor]) -> None:
        """Add one row per index in ``src``: a copy of that row, with ``overrides`` (key
        attributes) replacing some values; new rows start with zero Adam moments."""

    def reserve(self, rows: int) -> None:  # noqa: B027 (engines without device tables grow freely)
        """Allocate device memory for ``rows`` Gaussians now, so growth never reallocates
        (a copy would briefly need old and new memory, past a hard budget)."""

    @abstractmethod
    def extend(self, params: Mapping[str, Tensor]) -> None:
        """Add new Gaussians with the given raw values and zero Adam moments."""

    @abstractmethod
    def compact(self, plan: Compaction) -> None:
        """Remove rows (see :class:`Compaction`)."""

    @abstractmethod
    def reset_opacity(self, max_logit: float) -> None:
        """Clamp every opacity logit to ``max_logit`` and zero its Adam moments (3DGS reset)."""

    @abstractmethod
    def state_chunks(self, rows: int = STREAM_ROWS, lazy: bool = False) -> Iterator[RowChunk]:
        """Every row in order, at most ``rows`` at a time, on the CPU, caught up to
        ``self.step`` without changing the engine's state; with ``lazy``, as they are, with
        each row's ``last`` where the engine updates rows lazily (a checkpoint: catching rows
        up early would change the rest of the run). A chunk may be a view of the engine's own
        memory: use it before the next one."""

    @abstractmethod
    def load_rows(self, source: RowSource) -> None:
        """Replace all rows and optimiser state with the source's, chunk by chunk; afterwards
        ``self.step`` is ``source.step``."""

    def snapshot(self) -> Snapshot:
        """Everything, caught up to ``self.step``, on the CPU, in one piece (tests, small
        models; large ones go through :meth:`state_chunks`)."""
        parts = [  # (a chunk may be reused by the next: copies)
            tuple({n: t.clone() for n, t in d.items()} for d in (c.params, *c.moments()))
            for c in self.state_chunks()
        ]
        joined = [
            {n: torch.cat([p[k][n] for p in parts]) for n in self.spec.names} for k in range(3)
        ]
        if not parts:
            joined = [{a.name: torch.zeros(0, *a.shape) for a in self.spec}] * 3
        return Snapshot(joined[0], joined[1], joined[2], self.step)

    def load(self, snap: Snapshot) -> None:
        """Replace all rows and optimiser state with a snapshot's."""
        chunk = RowChunk(dict(snap.params), dict(snap.exp_avg), dict(snap.exp_avg_sq))
        self.load_rows(RowSource(len(chunk), [chunk], snap.step))

    def close(self) -> None:  # noqa: B027 (engines without background work have nothing to stop)
        """Stop background work (threads, streams); the engine is unusable afterwards."""
