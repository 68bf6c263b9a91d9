"""Final gradients back to the host: rows whose last use in a batch is done are copied into a
pinned staging ring on their own CUDA stream, and the CPU Adam thread updates them while the
GPU renders the next views.

A row whose batch gradient is zero in every column (it was culled in but occluded, or under
the alpha threshold everywhere) is not stepped: its step is a skipped step, applied in closed
form when the row is next caught up, which is exact. On CUDA such rows do not even leave the
GPU: a kernel packs the others into the staging ring with zero-copy writes
(``kernels/compact.cu``); elsewhere the CPU Adam reads and skips them. The packing's blocks
hold SMs while PCIe drains their writes, so where nearly every row has a gradient (the rows a
walk found read, :mod:`clm.offload.read_rows`) the flush copies them whole with the copy
engine instead, and the CPU Adam skips the few zero rows. Rows used in several
stretches of a batch's views have partial gradients; they are *deferred*, summed per row on
the host as they arrive (:mod:`clm.offload.row_sums`) and stepped once at the end of the batch
(a zero partial gradient adds nothing, so it stays behind too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from clm.offload.cuda_kernels import cupy_available, kernel, launch, pointer
from clm.offload.lazy_rows import HostRows
from clm.offload.row_sums import RowSums
from clm.offload.worker import BackgroundQueue, StagingRing, wait_for

STAGING_ROWS = 1 << 20  # gradient rows the pinned staging ring holds, at least
MAX_STAGING_ROWS = 1 << 23  # and at most (about 1.8 GB pinned for 3DGS at SH degree 3)
PART_ROWS = 1 << 19  # rows one download moves (its GPU temporaries grow with it)


def staging_rows_for(cache_rows: int | None) -> int:
    """The staging ring for a row cache of ``cache_rows``: large enough for the gradients of
    the rows a batch renders, up to the cache's size, so that a batch's flush seldom waits for
    its own CPU Adam to free room, and the next batch is culled and walked while that Adam
    runs (with a 1M-row ring, a batch of 8.5M rows kept the main thread waiting 0.28 s a step
    at 40M Gaussians)."""
    return min(max(STAGING_ROWS, cache_rows or 0), MAX_STAGING_ROWS)


def in_row_order(ids: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """``ids`` ascending, with their ``slots``: the CPU Adam then walks the host rows in
    address order, which it steps faster than rows in the cache's order (342 against 370 ms
    a step at 40M Gaussians)."""
    ids, order = torch.sort(ids)
    return ids, slots[order]


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Work queued inside goes to ``stream`` (nothing changes without one)."""
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


def record_event(device: torch.device, stream: torch.cuda.Stream | None = None):
    """An event recorded on ``stream`` (the current one by default); None off CUDA."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


class GradientFlush:
    """Sends gradient rows to the host rows' CPU Adam (see the module docstring)."""

    def __init__(self, host: HostRows, device: torch.device, staging_rows: int) -> None:
        self.host = host
        self.device = device
        cuda = device.type == "cuda"
        self.staging = StagingRing(staging_rows, host.width, pinned=cuda)
        self.worker = BackgroundQueue("clm-cpu-adam")
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.can_compact = cuda and cupy_available()  # rows without gradient may stay on the GPU
        self.deferred = RowSums(host.width, host.adam.threads)  # (the CPU Adam thread's alone)
        self.rows_flushed = 0  # over the run, final gradient rows sent towards the host
        self.rows_sent = 0  # of those, and of deferred ones, rows that crossed to the host
        self.rows_stepped = 0  # rows the CPU Adam updated (the rest had no gradient)
        self._deferring = False  # whether this batch sent partial gradients

    def _download(
        self, grads: Tensor, rows: Tensor, compact: bool = True
    ) -> tuple[int, torch.cuda.Event | None]:
        """Gradient rows into the staging ring, on the D2H stream (``compact``: the rows without
        gradient left out, where a kernel can); how many arrived is ``staging.filled[start]``
        once the returned event has passed."""
        n = rows.numel()
        start = self.staging.acquire(n)
        ready = record_event(self.device)
        with on_stream(self.stream):
            if self.stream is not None and ready is not None:
                self.stream.wait_event(ready)
                # Made on the compute stream, read on this one: not to be reused before.
                grads.record_stream(self.stream)
                rows.record_stream(self.stream)
            if compact and self.can_compact:
                self._compact(grads, rows, start)
            else:
                self.staging.grads_view(start, n, grads.shape[1]).copy_(grads, non_blocking=True)
                self.staging.rows[start : start + n].copy_(rows, non_blocking=True)
                self.staging.filled[start] = n
            done = record_event(self.device, self.stream)
        return start, done

    def _compact(self, grads: Tensor, rows: Tensor, start: int) -> None:
        """The rows of ``grads`` with any nonzero value, packed in order at ``start`` of the
        staging ring, and their count in ``staging.filled[start]`` (on the current stream, no
        host sync)."""
        n, width = grads.shape
        grads = grads.contiguous()
        kept = torch.cumsum(grads.ne(0).any(dim=1), 0)
        self.staging.filled[start : start + 1].copy_(kept[-1:], non_blocking=True)
        args = (
            pointer(grads),
            pointer(rows),
            pointer(kept),
            np.int64(n),
            np.int32(width),
            np.uint64(self.staging.grads_view(start, n, width).data_ptr()),
            np.uint64(self.staging.rows[start:].data_ptr()),
        )
        pieces = (width + 3) // 4  # one thread per 4-float piece of a row
        launch(kernel("compact.cu", "compact_rows"), n * pieces, args, stream=self.stream)

    def _arrived(self, start: int) -> tuple[Tensor, int]:
        """The row ids that arrived at ``start`` (after its event), and how many."""
        m = int(self.staging.filled[start])
        self.rows_sent += m
        return self.staging.rows[start : start + m], m

    def flush(
        self,
        cache_grad: Tensor,
        ids: Tensor,
        slots: Tensor,
        width: int,
        step: int,
        compact: bool = True,
    ) -> int:
        """Final gradients of rows ``ids`` (in ``cache_grad[slots]``): to the host, then the
        CPU Adam, in the background; returns the bytes queued. With ``compact``, on CUDA, the
        rows without gradient among them stay on the GPU (:attr:`rows_sent` counts what
        crossed); without, every row is copied (for rows that nearly all have a gradient)."""
        total = 0
        part = min(self.staging.capacity // 2, PART_ROWS)
        ids, slots = in_row_order(ids, slots)
        for lo in range(0, ids.numel(), part):
            rows, s = ids[lo : lo + part], slots[lo : lo + part]
            start, done = self._download(cache_grad[s, :width], rows, compact)
            n = rows.numel()

            def job(start=start, n=n, done=done) -> None:
                wait_for(done)
                rows, m = self._arrived(start)
                grads = self.staging.grads_view(start, m, width)
                self._stepped(n, self.host.step_rows(rows, grads, width, step) if m else 0)
                self.staging.release()

            self.worker.submit(job)
            total += n * width * 4
        return total

    def _stepped(self, flushed: int, stepped: int) -> None:
        self.rows_flushed += flushed
        self.rows_stepped += stepped

    def defer(
        self, cache_grad: Tensor, ids: Tensor, slots: Tensor, width: int, compact: bool = True
    ) -> int:
        """Partial gradients of rows used in several stretches: kept until the batch ends. They
        leave the GPU like final ones, through the staging ring on the copy stream; the CPU
        Adam thread adds them to their rows' sums (no wait here). ``compact`` and the bytes
        returned are as in :meth:`flush`."""
        total = 0
        part = min(self.staging.capacity // 2, PART_ROWS)
        for lo in range(0, ids.numel(), part):
            rows = ids[lo : lo + part]
            start, done = self._download(cache_grad[slots[lo : lo + part], :width], rows, compact)
            n = rows.numel()

            def job(start=start, done=done) -> None:
                wait_for(done)
                rows, m = self._arrived(start)
                self.deferred.add(rows, self.staging.grads_view(start, m, width), len(self.host))
                self.staging.release()

            self.worker.submit(job)
            self._deferring = True
            total += n * width * 4
        return total

    def flush_deferred(self, width: int, step: int) -> None:
        """Step the deferred rows once, with their summed gradients (on the CPU Adam thread,
        after every part has arrived). A batch that deferred none queues nothing: a job wakes
        the CPU Adam thread, which then takes the GIL from the main thread."""
        if not self._deferring:
            return
        self._deferring = False

        def job() -> None:
            for rows, summed in self.deferred.sums(width):
                self._stepped(rows.numel(), self.host.step_rows(rows, summed, width, step))
            self.deferred.clear()

        self.worker.submit(job)

    def drain(self) -> None:
        self.worker.drain()

    def close(self) -> None:
        self.worker.close()
