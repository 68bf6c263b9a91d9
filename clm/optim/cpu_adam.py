"""Lazy Adam for the attributes kept in (pinned) host memory, updated on the CPU.

The host row store keeps each array in chunks of ``R = 2^s`` rows; :class:`CpuRowAdam` updates
rows in place across chunks. It uses the native OpenMP kernel (``kernels/cpu_adam.c``) when a C
compiler is available, which releases the GIL and so runs alongside the training loop in a
background thread, and otherwise the torch implementation of :mod:`clm.optim.lazy_adam` applied
chunk by chunk. The semantics (and their one approximation) are described there.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from clm.optim import native
from clm.optim.lazy_adam import (
    AdamConfig,
    Segment,
    active_width,
    bias_corrections,
    check_segments,
    lazy_catch_up,
    lazy_step_rows,
)


class RowChunks(Protocol):
    """The chunked arrays of a host row store: ``[R, W]`` float32 chunks and ``[R]`` int32."""

    param_chunks: list[Tensor]
    exp_avg_chunks: list[Tensor]
    exp_avg_sq_chunks: list[Tensor]
    last_chunks: list[Tensor]


class _Store(ctypes.Structure):
    _fields_ = [
        ("param", ctypes.POINTER(ctypes.c_void_p)),
        ("exp_avg", ctypes.POINTER(ctypes.c_void_p)),
        ("exp_avg_sq", ctypes.POINTER(ctypes.c_void_p)),
        ("last", ctypes.POINTER(ctypes.c_void_p)),
        ("chunk_shift", ctypes.c_int64),
        ("row_stride", ctypes.c_int64),
    ]


class _Segment(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_int64),
        ("end", ctypes.c_int64),
        ("neg_step_size", ctypes.c_float),
        ("skip", ctypes.c_void_p),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("lerp_weight", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("bc2_sqrt", ctypes.c_float),
        ("eps", ctypes.c_float),
    ]


def _load_kernel() -> ctypes.CDLL | None:
    lib = native.load("cpu_adam")
    if lib is not None:
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        # (store, width, rows, n) ... (segments, n_segments, decay1, decay2, n_threads)
        head = [ctypes.POINTER(_Store), i64, ptr, i64]
        tail = [ctypes.POINTER(_Segment), i32, ptr, ptr, i32]
        step_args = [ptr, i64, i32, ctypes.POINTER(_Step)]  # grads, grad_stride, step, scalars
        # ... decay1, decay2, skip_zero, n_threads
        lib.clm_adam_step_rows.argtypes = [*head, *step_args, *tail[:-1], i32, i32]
        lib.clm_adam_step_rows.restype = ctypes.c_int64
        lib.clm_adam_catch_up.argtypes = [*head, i32, *tail]  # i32: upto
        lib.clm_adam_catch_up.restype = ctypes.c_int64
    return lib


class CpuRowAdam:
    """Lazy Adam over the chunked rows of a host store (see module docstring).

    ``threads`` is the number of OpenMP threads of the native kernel (default: every core this
    process may use but one); the torch fallback uses torch's own thread pool. Calls on disjoint
    rows may run at once from several threads, as long as the store's chunks and the segment
    tables do not change meanwhile (advance the tables between steps, from one thread).
    """

    def __init__(
        self,
        store: RowChunks,
        config: AdamConfig,
        *,
        threads: int | None = None,
        use_native: bool = True,
    ) -> None:
        self.store = store
        self.config = config
        # One core stays with the training loop: it must keep launching GPU work.
        self.threads = threads if threads is not None else max(1, len(os.sched_getaffinity(0)) - 1)
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        self._lib = _load_kernel() if use_native else None
        self._view: _Store | None = None
        self._view_ids: list[list[int]] = []
        self._view_refs: list[weakref.ref[Tensor]] = []

    @property
    def native(self) -> bool:
        """Whether updates run in the native kernel (else in torch, chunk by chunk)."""
        return self._lib is not None

    def step_rows(
        self,
        rows: Tensor,
        grads: Tensor,
        width: int,
        step: int,
        segments: Sequence[Segment],
        skip_zero: bool = True,
    ) -> int:
        """Adam step ``step`` (from 1) for ``rows`` ([n] int64, unique, and not yet updated at
        this step) with gradients ``grads[:, :width]`` ([n, >= width] float32, rows contiguous);
        returns the number of rows stepped.

        Pending skipped steps are applied first; only columns ``< width`` are touched. With
        ``skip_zero``, a row whose gradient is all zero is left alone: its step is a skipped
        step like any other (exact but for the catch-up's one approximation, see lazy_adam).
        Segment tables must be at ``step - 1`` (advance them after the last call of a step).
        """
        n_cols = self._check_store()
        self._check_segments(segments, n_cols, step - 1)
        width = active_width(width, n_cols)
        n = self._check_rows(rows)
        if grads.dtype != torch.float32 or grads.device.type != "cpu" or grads.dim() != 2:
            raise ValueError("grads must be a 2-D float32 CPU tensor")
        if grads.shape[0] != n or grads.shape[1] < width or grads.stride(1) != 1:
            raise ValueError(
                f"grads must be [{n}, >= {width}] with contiguous rows, got {tuple(grads.shape)}"
            )
        if n == 0:
            return 0
        if self._lib is None:
            stepped = [0]

            def update(chunk, r, g) -> None:
                stepped[0] += lazy_step_rows(*chunk, r, g, step, segments, width, skip_zero)

            self._per_chunk(rows, grads, update)
            return stepped[0]
        b1, b2 = self.config.betas
        bc1, bc2_sqrt = bias_corrections(self.config, step)
        scalars = _Step(1 - b1, b2, 1 - b2, bc2_sqrt, self.config.eps)
        segs = (_Segment * len(segments))(
            *(_Segment(s.start, s.end, -(s.lr / bc1), s.table.sums.data_ptr()) for s in segments)
        )
        decay = segments[0].table.decay
        view = self._pointers()
        return self._lib.clm_adam_step_rows(
            ctypes.byref(view),
            width,
            rows.data_ptr(),
            n,
            grads.data_ptr(),
            grads.stride(0),
            step,
            ctypes.byref(scalars),
            segs,
            len(segments),
            decay[0].data_ptr(),
            decay[1].data_ptr(),
            int(skip_zero),
            self.threads,
        )

    def catch_up(
        self,
        rows: Tensor | None,
        step: int,
        segments: Sequence[Segment],
        width: int | None = None,
    ) -> int:
        """Apply every pending zero-gradient step up to and including ``step`` to ``rows`` (all
        rows when None) without a new gradient, leaving ``last = step``; for checkpoints, export
        and densification. Segment tables must be at ``step``. ``width`` (default: all columns)
        limits the columns touched; inactive columns have zero state, so leaving them is exact.
        Returns how many rows had steps pending (their values were read and written).
        """
        n_cols = self._check_store()
        self._check_segments(segments, n_cols, step)
        width = active_width(width, n_cols)
        if self._lib is None:
            if rows is None:
                return sum(
                    int(lazy_catch_up(*chunk, None, step, segments, width))
                    for chunk in self._chunks()
                )
            self._check_rows(rows)
            pending = [0]

            def catch_up(chunk, r, _) -> None:
                pending[0] += int(lazy_catch_up(*chunk, r, step, segments, width))

            self._per_chunk(rows, None, catch_up)
            return pending[0]
        n = (
            len(self.store.param_chunks) * self._rows_per_chunk()
            if rows is None
            else self._check_rows(rows)
        )
        decay = segments[0].table.decay
        segs = (_Segment * len(segments))(
            *(_Segment(s.start, s.end, 0.0, s.table.sums.data_ptr()) for s in segments)
        )
        view = self._pointers()
        return self._lib.clm_adam_catch_up(
            ctypes.byref(view),
            width,
            None if rows is None else rows.data_ptr(),
            n,
            step,
            segs,
            len(segments),
            decay[0].data_ptr(),
            decay[1].data_ptr(),
            self.threads,
        )

    def _check_store(self) -> int:
        """Validate the first chunk's layout (the store keeps all chunks alike); returns W."""
        s = self.store
        if not (
            len(s.param_chunks)
            == len(s.exp_avg_chunks)
            == len(s.exp_avg_sq_chunks)
            == len(s.last_chunks)
        ):
            raise ValueError("store chunk lists differ in length")
        if not s.param_chunks:
            raise ValueError("store has no chunks")
        p, last = s.param_chunks[0], s.last_chunks[0]
        r = p.shape[0]
        if p.dtype != torch.float32 or p.dim() != 2 or r & (r - 1) or not p.is_contiguous():
            raise ValueError("param chunks must be contiguous [2^s, W] float32 tensors")
        if last.dtype != torch.int32 or last.shape != (r,):
            raise ValueError(f"last chunks must be [{r}] int32 tensors")
        return p.shape[1]

    def _check_segments(self, segments: Sequence[Segment], n_cols: int, table_step: int) -> None:
        if check_segments(segments, n_cols, table_step) != self.config:
            raise ValueError("segment tables use a different AdamConfig than this optimiser")
        if self._lib is not None and segments[0].table.device.type != "cpu":
            raise ValueError("skip tables of CPU rows must live on the CPU")

    def _check_rows(self, rows: Tensor) -> int:
        if rows.dtype != torch.int64 or rows.dim() != 1 or not rows.is_contiguous():
            raise ValueError("rows must be a contiguous 1-D int64 tensor")
        if rows.device.type != "cpu":
            raise ValueError("rows must be a CPU tensor")
        if rows.numel():
            lo, hi = torch.aminmax(rows)
            capacity = len(self.store.param_chunks) * self._rows_per_chunk()
            if lo.item() < 0 or hi.item() >= capacity:
                raise ValueError(f"rows must be in 0..{capacity - 1}")
        return rows.numel()

    def _rows_per_chunk(self) -> int:
        return self.store.param_chunks[0].shape[0]

    def _chunks(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        s = self.store
        return list(
            zip(s.param_chunks, s.exp_avg_chunks, s.exp_avg_sq_chunks, s.last_chunks, strict=True)
        )

    def _pointers(self) -> _Store:
        """The kernel's view of the store: chunk pointer arrays, rebuilt whenever a chunk list
        holds other tensor objects than last time (growth, replacement).

        Chunks must be replaced, never resized in place. Every chunk is checked on a rebuild,
        since a mismatched one would be accessed out of bounds by the kernel. Chunks are
        recognised by id; a weak reference drops the view when one of them is freed, so a new
        chunk reusing a freed one's id is never mistaken for it.
        """
        s = self.store
        lists = (s.param_chunks, s.exp_avg_chunks, s.exp_avg_sq_chunks, s.last_chunks)
        ids = [list(map(id, chunks)) for chunks in lists]
        if self._view is not None and ids == self._view_ids:
            return self._view
        first = s.param_chunks[0]
        shapes = (first.shape,) * 3 + (first.shape[:1],)
        dtypes = (torch.float32,) * 3 + (torch.int32,)
        arrays = []
        for chunks, shape, dtype in zip(lists, shapes, dtypes, strict=True):
            for t in chunks:
                if t.shape != shape or t.dtype != dtype or not t.is_contiguous() or t.is_cuda:
                    raise ValueError(
                        f"store chunk of shape {tuple(t.shape)} {t.dtype} does not match"
                    )
            arrays.append((ctypes.c_void_p * len(chunks))(*(t.data_ptr() for t in chunks)))
        shift = first.shape[0].bit_length() - 1
        # The struct holds references to the pointer arrays, keeping them alive.
        self._view = _Store(*arrays, shift, first.shape[1])
        self._view_ids = ids
        self._view_refs = [weakref.ref(t, self._drop_view) for chunks in lists for t in chunks]
        return self._view

    def _drop_view(self, _: weakref.ref[Tensor]) -> None:
        self._view = None

    def _per_chunk(
        self,
        rows: Tensor,
        grads: Tensor | None,
        update: Callable[[tuple[Tensor, Tensor, Tensor, Tensor], Tensor, Tensor | None], None],
    ) -> None:
        """Torch fallback: group rows by chunk and run ``update(chunk, local_rows, grads)``."""
        shift = self._rows_per_chunk().bit_length() - 1
        chunk_ids, order = torch.sort(rows >> shift)
        ids, counts = torch.unique_consecutive(chunk_ids, return_counts=True)
        local = rows[order] & ((1 << shift) - 1)
        grads = None if grads is None else grads[order]
        chunks = self._chunks()
        start = 0
        for cid, count in zip(ids.tolist(), counts.tolist(), strict=True):
            sl = slice(start, start + count)
            update(chunks[cid], local[sl], None if grads is None else grads[sl])
            start += count
