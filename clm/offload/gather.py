"""Host rows into GPU cache slots (a zero-copy kernel reading pinned memory over PCIe), and the
torch twin that does the same on machines without CUDA."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from clm.offload.cuda_kernels import cupy_available, kernel, launch, pointer
from clm.offload.host_store import HostStore

log = logging.getLogger(__name__)


# cudaDevAttrCanUseHostPointerForRegisteredMem: kernels may use a registered host pointer as is.
_HOST_POINTER_ATTRIBUTE = 91


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
        self._pointers: Tensor | None = None
        self._pointer_key: tuple[int, ...] = ()

    def _chunk_pointers(self) -> Tensor:
        """Device addresses of the chunks (cached until the chunk list changes). Registered,
        mapped host memory has the same address on the GPU (checked in ``__init__``)."""
        key = tuple(t.data_ptr() for t in self.store.param_chunks)
        if key != self._pointer_key:
            ptrs = np.array(key, dtype=np.uint64).view(np.int64)
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
    ) -> None:
        """``out[slots, :width] = host[rows, :width]`` and zero ``grad_out`` there."""
        if rows.numel() == 0:
            return
        if not self.use_kernel:
            values = self.store.gather_params(rows)[:, :width].to(out.device)
            out[slots, :width] = values
            if grad_out is not None:
                grad_out[slots, :width] = 0
            return
        args = (
            pointer(self._chunk_pointers()),
            np.int32(self.store.chunk_shift),
            np.int64(self.store.width),
            pointer(rows),
            pointer(slots),
            np.int64(rows.numel()),
            np.int32(width),
            pointer(out),
            pointer(grad_out) if grad_out is not None else np.uint64(0),
            np.int64(out.shape[1]),
        )
        pieces = (width + 3) // 4  # one thread per 4-float piece of a row
        launch(kernel("gather.cu", "gather_rows"), rows.numel() * pieces, args, stream=stream)
