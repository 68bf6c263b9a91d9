"""Per-row sums of partial gradients, for rows used in several stretches of a batch's views.

Each part is added to its row's sum as it arrives, in a slot the row gets the first time it
shows up: no copy of the parts is kept, and no sort finds equal rows at the end of the batch.
The sums live in blocks of ``2^block_shift`` rows, so they grow without copying; a row-to-slot
index of one int32 per host row says where each row's sum is (-1: none yet). The native kernel
(``kernels/row_sums.c``) is used where a C compiler is available, torch elsewhere; both add the
parts of a row one after another in arrival order, in float32.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import torch
from torch import Tensor

from clm.optim import native

BLOCK_SHIFT = 16  # rows per block of sums: 2^16, 12 MiB at 48 columns


def _load_kernel() -> ctypes.CDLL | None:
    lib = native.load("row_sums")
    if lib is not None:
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        # slot_of, rows, n, grads, grad_stride, width, blocks, block_shift, block_stride,
        # row_of_slot, count, n_threads
        lib.clm_row_sums_add.argtypes = [ptr, ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, i32]
        lib.clm_row_sums_add.restype = i64
        lib.clm_row_sums_clear.argtypes = [ptr, ptr, i64, i32]
        lib.clm_row_sums_clear.restype = None
    return lib


class RowSums:
    """Sums of ``[n, <= width]`` float32 gradient rows per row id (see the module docstring).

    Used from one thread at a time (the CPU Adam thread). ``threads``: OpenMP threads of the
    native kernel.
    """

    def __init__(
        self, width: int, threads: int, block_shift: int = BLOCK_SHIFT, use_native: bool = True
    ) -> None:
        self.width = width
        self.threads = threads
        self.block_shift = block_shift
        self.blocks: list[Tensor] = []
        self.count = 0  # slots in use
        self.slot_of = torch.empty(0, dtype=torch.int32)
        self.row_of_slot = torch.empty(0, dtype=torch.int64)
        self._lib = _load_kernel() if use_native else None
        self._block_pointers: ctypes.Array | None = None

    def add(self, rows: Tensor, grads: Tensor, row_count: int) -> None:
        """Add ``grads`` (``[n, w]``, rows contiguous) to the sums of ``rows`` (distinct int64
        ids below ``row_count``)."""
        n, w = grads.shape
        if n == 0:
            return
        self._reserve(self.count + n, row_count)
        if self._lib is None:
            self._add_torch(rows, grads)
            return
        count = self._lib.clm_row_sums_add(
            self.slot_of.data_ptr(),
            rows.data_ptr(),
            n,
            grads.data_ptr(),
            grads.stride(0),
            w,
            self._block_pointers,
            self.block_shift,
            self.width,
            self.row_of_slot.data_ptr(),
            self.count,
            self.threads,
        )
        if count < 0:
            raise MemoryError(f"no memory to index {n} gradient rows")
        self.count = count

    def sums(self, width: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(rows, summed gradients[:, :width])``, block by block, in slot order."""
        size = 1 << self.block_shift
        for b, block in enumerate(self.blocks):
            lo = b * size
            if lo >= self.count:
                return
            hi = min(self.count, lo + size)
            yield self.row_of_slot[lo:hi], block[: hi - lo, :width]

    def clear(self) -> None:
        """Forget every sum (the blocks are kept for the next batch)."""
        if self._lib is not None:
            self._lib.clm_row_sums_clear(
                self.slot_of.data_ptr(), self.row_of_slot.data_ptr(), self.count, self.threads
            )
        else:
            self.slot_of[self.row_of_slot[: self.count]] = -1
        self.count = 0

    def _reserve(self, slots: int, row_count: int) -> None:
        if self.slot_of.numel() < row_count:
            grown = torch.full((row_count - self.slot_of.numel(),), -1, dtype=torch.int32)
            self.slot_of = torch.cat([self.slot_of, grown])
        if self.row_of_slot.numel() < slots:
            more = max(slots, 2 * self.row_of_slot.numel()) - self.row_of_slot.numel()
            self.row_of_slot = torch.cat([self.row_of_slot, torch.empty(more, dtype=torch.int64)])
        size = 1 << self.block_shift
        if len(self.blocks) * size < slots:
            while len(self.blocks) * size < slots:
                self.blocks.append(torch.empty(size, self.width))
            pointers = (ctypes.c_void_p * len(self.blocks))(*(b.data_ptr() for b in self.blocks))
            self._block_pointers = pointers

    def _add_torch(self, rows: Tensor, grads: Tensor) -> None:
        slots = self.slot_of[rows].long()
        fresh = slots < 0
        count = int(fresh.sum())
        if count:
            new = torch.arange(self.count, self.count + count)
            slots[fresh] = new
            self.slot_of[rows[fresh]] = new.int()
            self.row_of_slot[new] = rows[fresh]
            self.count += count
        w = grads.shape[1]
        block, at = slots >> self.block_shift, slots & ((1 << self.block_shift) - 1)
        for b in torch.unique(block).tolist():
            mine = block == b
            target = self.blocks[b][:, :w]
            new_here, old_here = mine & fresh, mine & ~fresh
            target[at[new_here]] = grads[new_here]
            target.index_add_(0, at[old_here], grads[old_here])
