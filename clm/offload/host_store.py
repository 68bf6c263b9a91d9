"""Host rows: the non-key attributes of every Gaussian and their Adam state, in chunks of pinned
memory that the GPU reads directly (zero-copy) and the CPU Adam updates in place.

Chunks mean there is no capacity to guess and no reallocation: densification adds chunks, pruning
fills holes from the tail and frees emptied chunks. Before a chunk is added the store checks the
``--max-host-gb`` budget and the memory the OS still has, and refuses with a clear error while
nothing has been changed. Without CUDA the same code runs on ordinary memory.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from clm.errors import ClmError
from clm.model.table import Compaction

log = logging.getLogger(__name__)

# Leave this much RAM to the OS and everything else: pinned pages cannot be swapped out.
HOST_RESERVE_BYTES = 2 << 30
CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02
CUDA_HOST_ALLOC_PORTABLE_MAPPED = 0x01 | 0x02


def available_host_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _PinnedBlock:
    """One page-locked allocation the GPU can read through the same address (UVA).

    ``cudaHostAlloc`` (through CuPy) gives memory the GPU reaches at full PCIe speed even for
    random rows; memory registered after ``malloc`` sits on small pages and random reads thrash
    the GPU's address translation. Torch's own pinned allocator is not used: it rounds sizes up
    to a power of two. Registration remains the fallback when CuPy is missing.
    """

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        try:
            import cupy

            ptr = cupy.cuda.runtime.hostAlloc(nbytes, CUDA_HOST_ALLOC_PORTABLE_MAPPED)
        except ImportError:
            ptr = None
        except Exception as exc:  # CuPy reports an allocation failure as its own error type
            raise ClmError(f"cannot pin {nbytes / 2**30:.2f} GiB of host memory ({exc})") from None
        if ptr is not None:
            buffer = (ctypes.c_byte * nbytes).from_address(ptr)
            self.tensor = torch.frombuffer(buffer, dtype=dtype, count=numel)
            weakref.finalize(self, _free_host, ptr, self.tensor)
            return
        self.tensor = torch.empty(numel, dtype=dtype)
        ptr = self.tensor.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, CUDA_HOST_REGISTER_PORTABLE_MAPPED)
        if int(err) != 0:
            raise ClmError(f"cannot pin {nbytes / 2**30:.2f} GiB of host memory (CUDA error {err})")
        # The finalizer holds the tensor, so the memory is unregistered before it is freed.
        weakref.finalize(self, _unregister, ptr, self.tensor)


def _unregister(ptr: int, _tensor: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def _free_host(ptr: int, _tensor: torch.Tensor) -> None:
    import cupy

    cupy.cuda.runtime.freeHost(ptr)


class HostStore:
    """``N`` rows of ``width`` float32 parameters, with Adam moments and a last-update step.

    Row ``r`` lives in chunk ``r >> chunk_shift`` at offset ``r & (chunk_rows - 1)``.
    """

    def __init__(
        self,
        width: int,
        chunk_shift: int = 20,
        pinned: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self.width = width
        self.chunk_shift = chunk_shift
        self.chunk_rows = 1 << chunk_shift
        self.pinned = pinned
        self.max_bytes = max_bytes
        self.param_chunks: list[Tensor] = []
        self.exp_avg_chunks: list[Tensor] = []
        self.exp_avg_sq_chunks: list[Tensor] = []
        self.last_chunks: list[Tensor] = []
        self._blocks: list[object] = []
        self._len = 0

    # ---- size ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    @property
    def bytes_per_row(self) -> int:
        return 3 * self.width * 4 + 4

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.bytes_per_row

    @property
    def allocated_bytes(self) -> int:
        return len(self.param_chunks) * self.chunk_bytes

    @property
    def capacity(self) -> int:
        return len(self.param_chunks) * self.chunk_rows

    def _new_chunk(self) -> None:
        need = self.chunk_bytes
        if self.max_bytes is not None and self.allocated_bytes + need > self.max_bytes:
            raise ClmError(
                f"host budget --max-host-gb {self.max_bytes / 2**30:g} is full at "
                f"{self._len} Gaussians ({self.bytes_per_row} bytes each); raise it or cap growth"
            )
        free = available_host_bytes()
        if free is not None and free - need < HOST_RESERVE_BYTES:
            raise ClmError(
                f"host memory would run out: {free / 2**30:.1f} GiB available, a chunk of "
                f"{need / 2**30:.2f} GiB needed for more than {self._len} Gaussians"
            )
        rows, width = self.chunk_rows, self.width
        # One allocation per chunk, zeroed: rows past the end hold a valid (empty) state, so a
        # whole-chunk catch-up never reads garbage.
        if self.pinned:
            block = _PinnedBlock(rows * (3 * width + 1), torch.float32)
            self._blocks.append(block)
            flat = block.tensor.zero_()
        else:
            flat = torch.zeros(rows * (3 * width + 1))
        parts = flat[: 3 * rows * width].view(3, rows, width)
        param, m, v = parts[0], parts[1], parts[2]
        last = flat[3 * rows * width :].view(torch.int32)
        self.param_chunks.append(param)
        self.exp_avg_chunks.append(m)
        self.exp_avg_sq_chunks.append(v)
        self.last_chunks.append(last)

    def reserve(self, rows: int) -> None:
        """Add chunks until ``rows`` fit; on a budget error nothing has been changed."""
        needed = -(-rows // self.chunk_rows) - len(self.param_chunks)
        if needed <= 0:
            return
        if self.max_bytes is not None:
            total = (len(self.param_chunks) + needed) * self.chunk_bytes
            if total > self.max_bytes:
                raise ClmError(
                    f"host budget --max-host-gb {self.max_bytes / 2**30:g} cannot hold {rows} "
                    f"Gaussians ({self.bytes_per_row} bytes each)"
                )
        for _ in range(needed):
            self._new_chunk()

    def _arrays(self) -> tuple[list[Tensor], ...]:
        return self.param_chunks, self.exp_avg_chunks, self.exp_avg_sq_chunks, self.last_chunks

    # ---- rows ---------------------------------------------------------------------------------

    def chunk_slices(self, start: int, stop: int):
        """(chunk index, offset in chunk, offset in the range, count) covering [start, stop)."""
        pos = start
        while pos < stop:
            chunk, offset = pos >> self.chunk_shift, pos & (self.chunk_rows - 1)
            count = min(self.chunk_rows - offset, stop - pos)
            yield chunk, offset, pos - start, count
            pos += count

    def append(
        self,
        params: Tensor,
        step: int,
        exp_avg: Tensor | None = None,
        exp_avg_sq: Tensor | None = None,
        last: Tensor | None = None,
    ) -> None:
        """Add rows, considered up to date at ``step`` (or each at its ``last``), with the
        given Adam moments (zeros when None)."""
        n = params.shape[0]
        self.reserve(self._len + n)
        for chunk, offset, src, count in self.chunk_slices(self._len, self._len + n):
            for chunks, values in (
                (self.param_chunks, params),
                (self.exp_avg_chunks, exp_avg),
                (self.exp_avg_sq_chunks, exp_avg_sq),
            ):
                target = chunks[chunk][offset : offset + count]
                if values is None:
                    target.zero_()
                else:
                    target.copy_(values[src : src + count])
            target = self.last_chunks[chunk][offset : offset + count]
            if last is None:
                target.fill_(step)
            else:
                target.copy_(last[src : src + count])
        self._len += n

    def _gather(self, chunks: Sequence[Tensor], rows: Tensor) -> Tensor:
        rows = rows.to("cpu", torch.int64)
        out = torch.empty((rows.numel(), *chunks[0].shape[1:]), dtype=chunks[0].dtype)
        which = rows >> self.chunk_shift
        for chunk in torch.unique(which).tolist():
            sel = torch.nonzero(which == chunk).squeeze(1)
            out[sel] = chunks[chunk][rows[sel] & (self.chunk_rows - 1)]
        return out

    def _scatter(self, chunks: Sequence[Tensor], rows: Tensor, values: Tensor) -> None:
        rows = rows.to("cpu", torch.int64)
        which = rows >> self.chunk_shift
        for chunk in torch.unique(which).tolist():
            sel = torch.nonzero(which == chunk).squeeze(1)
            chunks[chunk][rows[sel] & (self.chunk_rows - 1)] = values[sel]

    def gather_params(self, rows: Tensor) -> Tensor:
        """``[n, width]`` copy of the parameter rows (the CPU twin of the GPU gather kernel)."""
        return self._gather(self.param_chunks, rows)

    def read_rows(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of the parameters and both moments of ``rows``."""
        return tuple(self._gather(chunks, rows) for chunks in self._arrays()[:3])

    def last_of(self, rows: Tensor) -> Tensor:
        """Copies of the steps ``rows`` are up to date at."""
        return self._gather(self.last_chunks, rows)

    def write_rows(
        self, rows: Tensor, param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int
    ) -> None:
        """Overwrite ``rows`` with a state that is up to date at ``step``."""
        for chunks, values in zip(self._arrays()[:3], (param, exp_avg, exp_avg_sq), strict=True):
            self._scatter(chunks, rows, values)
        self._scatter(self.last_chunks, rows, torch.full((rows.numel(),), step, dtype=torch.int32))

    def compact(self, plan: Compaction) -> None:
        """Fill holes from the tail (O(removed) moves), then free chunks no longer needed."""
        if plan.holes.numel():
            for chunks in self._arrays():
                self._scatter(chunks, plan.holes, self._gather(chunks, plan.movers))
        self._len = plan.new_len
        keep_chunks = -(-self._len // self.chunk_rows)
        for chunks in self._arrays():
            del chunks[keep_chunks:]
        del self._blocks[keep_chunks:]

    # ---- whole-store access (checkpoints, export) ------------------------------------------

    def rows(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the parameters and both moments of rows ``[start, stop)``, which must lie in
        one chunk (see :meth:`chunk_slices`)."""
        chunk, offset = start >> self.chunk_shift, start & (self.chunk_rows - 1)
        if (stop - 1) >> self.chunk_shift != chunk:
            raise ValueError(f"rows {start}:{stop} span more than one chunk")
        end = offset + stop - start
        return (
            self.param_chunks[chunk][offset:end],
            self.exp_avg_chunks[chunk][offset:end],
            self.exp_avg_sq_chunks[chunk][offset:end],
        )

    def last_rows(self, start: int, stop: int) -> Tensor:
        """A view of the steps rows ``[start, stop)`` (in one chunk) are up to date at."""
        chunk, offset = start >> self.chunk_shift, start & (self.chunk_rows - 1)
        return self.last_chunks[chunk][offset : offset + stop - start]

    def clear(self) -> None:
        """Drop every row and free every chunk."""
        self._len = 0
        for chunks in self._arrays():
            chunks.clear()
        self._blocks.clear()
