"""Host rows into GPU cache slots (a zero-copy kernel reading pinned memory over PCIe), and the
torch twin that does the same on machines without CUDA."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from clm.offload.cuda_kernels import cupy_available, kernel, launch
from clm.offload.host_store import HostStore


class RowGather:
    """Copies ``width`` leading columns of host rows into rows of a device buffer."""

    def __init__(self, store: HostStore, device: torch.device) -> None:
        self.store = store
        self.device = device
        self.use_kernel = device.type == "cuda" and store.pinned and cupy_available()
        self._pointers: Tensor | None = None
        self._pointer_key: tuple[int, ...] = ()

    def _chunk_pointers(self) -> Tensor:
        """Device addresses of the chunks (cached until the chunk list changes)."""
        key = tuple(t.data_ptr() for t in self.store.param_chunks)
        if key != self._pointer_key:
            import cupy

            ptrs = [cupy.cuda.runtime.hostGetDevicePointer(p, 0) for p in key]
            self._pointers = torch.tensor(np.array(ptrs, dtype=np.uint64).view(np.int64))
            self._pointers = self._pointers.to(self.device)
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
        import cupy

        args = (
            cupy.asarray(self._chunk_pointers()),
            np.int32(self.store.chunk_shift),
            np.int64(self.store.width),
            cupy.asarray(rows),
            cupy.asarray(slots),
            np.int64(rows.numel()),
            np.int32(width),
            cupy.asarray(out),
            cupy.asarray(grad_out) if grad_out is not None else np.uint64(0),
            np.int64(out.shape[1]),
        )
        launch(kernel("gather.cu", "gather_rows"), rows.numel() * width, args, stream=stream)
