"""Host rows into GPU cache slots (a zero-copy kernel reading pinned memory over PCIe), caught
up on the way where they have skipped Adam steps pending (:mod:`clm.offload.catch_up`), and
the torch twin that does the same on machines without CUDA."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from clm.offload.catch_up import CatchUpTo
from clm.offload.cuda_kernels import cupy_available, launch_strided, pointer, side_kernel
from clm.offload.host_store import HostStore
from clm.optim.lazy_adam import catch_up_block

log = logging.getLogger(__name__)


# cudaDevAttrCanUseHostPointerForRegisteredMem: kernels may use a registered host pointer as is.
_HOST_POINTER_ATTRIBUTE = 91
# SMs per block of the gather kernel. Its loads wait microseconds on PCIe, and an SM that
# holds them slows every kernel beside it (a render's rasterization 12 times), so the gather
# runs in a block on one SM in four, each thread keeping four pieces in flight.
_SMS_PER_BLOCK = 4


def _host_pointers_usable(device: torch.device) -> bool:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    usable = cupy.cuda.runtime.deviceGetAttribute(_HOST_POINTER_ATTRIBUTE, index) == 1
    if not usable:
        log.warning("this GPU cannot read registered host memory directly; gathers use torch")
    return usable


class RowGather:
    """Copies ``width`` leading columns of host rows into rows of a device buffer."""

    def __init__(self, store: HostStore, device: torch.device) -> None:
        self.store = store
        self.device = device
        self.use_kernel = (
            device.type == "cuda"
            and store.pinned
            and cupy_available()
            and _host_pointers_usable(device)
        )
        # the kernel's grid (a test may shrink it, to make every thread stride)
        self.max_blocks = (
            max(1, torch.cuda.get_device_properties(device).multi_processor_count // _SMS_PER_BLOCK)
            if self.use_kernel
            else 0
        )
        self._pointers: Tensor | None = None
        self._pointer_key: tuple[int, ...] = ()
        # Values the gathers caught up, over the run (on the device: counted without a sync).
        self._caught_up = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def values_caught_up(self) -> int:
        """Values (rows times columns) gathered with skipped steps pending, over the run: each
        read its two moments too (waits for the device)."""
        return int(self._caught_up)

    def _chunk_pointers(self) -> Tensor:
        """Device addresses ``[4, chunks]`` of the parameter, both moment and ``last`` chunks
        (cached until a chunk list changes). Registered, mapped host memory has the same
        address on the GPU (checked in ``__init__``)."""
        store = self.store
        lists = (store.param_chunks, store.exp_avg_chunks, store.exp_avg_sq_chunks)
        key = tuple(t.data_ptr() for chunks in (*lists, store.last_chunks) for t in chunks)
        if key != self._pointer_key:
            ptrs = np.array(key, dtype=np.uint64).view(np.int64).reshape(4, -1)
            self._pointers = torch.from_numpy(ptrs).to(self.device)
            self._pointer_key = key
        assert self._pointers is not None
        return self._pointers

    def gather(
        self,
        rows: Tensor,
        slots: Tensor,
        width: int,
        out: Tensor,
        grad_out: Tensor | None = None,
        stream: torch.cuda.Stream | None = None,
        catch_up: CatchUpTo | None = None,
    ) -> None:
        """``out[slots, :width] = host[rows, :width]`` and zero ``grad_out`` there; with
        ``catch_up``, the rows as they are once caught up to its step (the host rows are not
        changed)."""
        if rows.numel() == 0:
            return
        if not self.use_kernel:
            if catch_up is None:
                values = self.store.gather_params(rows)[:, :width]
            else:
                values = self._caught_up_twin(rows, width, catch_up)
            out[slots, :width] = values.to(out.device)
            if grad_out is not None:
                grad_out[slots, :width] = 0
            return
        null = np.uint64(0)
        args = (
            pointer(self._chunk_pointers()),
            np.int64(len(self.store.param_chunks)),
            np.int32(self.store.chunk_shift),
            np.int64(self.store.width),
            pointer(rows),
            pointer(slots),
            np.int64(rows.numel()),
            np.int32(width),
            pointer(out),
            pointer(grad_out) if grad_out is not None else null,
            np.int64(out.shape[1]),
            np.int32(0 if catch_up is None else catch_up.step),
            null if catch_up is None else pointer(catch_up.sums),
            np.int64(0 if catch_up is None else catch_up.sums.stride(0)),
            null if catch_up is None else pointer(catch_up.column_segment),
            pointer(self._caught_up),
        )
        pieces = (width + 3) // 4  # the kernel moves rows in 4-float pieces
        fn = side_kernel("gather.cu", "gather_rows")
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        launch_strided(fn, rows.numel() * pieces, args, stream, self.max_blocks)

    def _caught_up_twin(self, rows: Tensor, width: int, catch_up: CatchUpTo) -> Tensor:
        """The kernel's catch-up in torch, on copies of the rows."""
        p, m, v = (x[:, :width] for x in self.store.read_rows(rows))
        last = self.store.last_of(rows)
        self._caught_up += (last < catch_up.step).sum().to(self.device) * width
        catch_up_block(p, m, v, last, catch_up.step, catch_up.segments, width)
        return p
