"""The CPU side of the pipeline: a pinned staging ring that gradients land in, and a background
queue that runs CPU work (Adam on rows whose gradients have arrived) while the main thread goes
on rendering."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor


class StagingRing:
    """Pinned ``[capacity, width]`` gradients and ``[capacity]`` row ids, handed out first in,
    first out. ``acquire`` blocks until the consumer has released enough space. ``filled[s]``:
    how many of the rows handed out at ``s`` hold data (the producer may fill fewer).

    The buffers are made at the first ``acquire``: a run whose rows all stay on the GPU never
    pins them. ``fit`` changes the capacity while nothing is handed out."""

    def __init__(self, capacity: int, width: int, pinned: bool) -> None:
        self.capacity, self.width, self.pinned = capacity, width, pinned
        self.grads = self.rows = self.filled = torch.empty(0)
        self._head = 0  # next free position
        self._used = 0  # rows handed out and not yet released, wrap padding included
        self._sizes: list[int] = []  # each acquisition's size, with the padding before it
        self._cond = threading.Condition()

    def fit(self, capacity: int) -> None:
        """Hold ``capacity`` rows from now on (the buffers are made again at the next
        ``acquire``); only while every acquisition has been released."""
        with self._cond:
            if self._used:
                raise RuntimeError("the staging ring is resized while rows are handed out")
            if capacity != self.capacity:
                self.capacity = capacity
                self.grads = self.rows = self.filled = torch.empty(0)

    def acquire(self, n: int) -> int:
        """Start of ``n`` contiguous rows (``n <= capacity``)."""
        if not 0 < n <= self.capacity:
            raise ValueError(f"staging request of {n} rows; capacity is {self.capacity}")
        if not self.filled.numel():
            pinned, capacity = self.pinned, self.capacity
            self.grads = torch.empty(capacity, self.width, pin_memory=pinned)
            self.rows = torch.empty(capacity, dtype=torch.int64, pin_memory=pinned)
            self.filled = torch.zeros(capacity, dtype=torch.int64, pin_memory=pinned)
        with self._cond:
            while True:
                if self._used == 0:
                    self._head = 0
                pad = self.capacity - self._head if self._head + n > self.capacity else 0
                if self._used + pad + n <= self.capacity:
                    break
                self._cond.wait()
            start = 0 if pad else self._head
            self._head = (start + n) % self.capacity
            self._used += pad + n
            self._sizes.append(pad + n)
            return start

    def grads_view(self, start: int, n: int, width: int) -> Tensor:
        """``[n, width]`` contiguous gradients in the rows handed out at ``start`` (so a narrower
        active width is still one contiguous, asynchronous copy)."""
        row = self.grads.shape[1]
        return self.grads.view(-1)[start * row : start * row + n * width].view(n, width)

    def release(self) -> None:
        """Give back the oldest acquisition."""
        with self._cond:
            self._used -= self._sizes.pop(0)
            self._cond.notify_all()


class BackgroundQueue:
    """Runs jobs one after another on a background thread; errors surface on :meth:`drain`."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            t0 = time.perf_counter()
            try:
                if self._error is None:
                    job()
            except BaseException as exc:  # re-raised in the main thread by drain()
                self._error = exc
            finally:
                self.busy_seconds += time.perf_counter() - t0
                self._jobs.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def mark(self) -> threading.Event:
        """An event set once every job submitted so far has run."""
        done = threading.Event()
        self.submit(done.set)
        return done

    def wait(self, event: threading.Event) -> float:
        """Block until ``event`` (from :meth:`mark`) is set, surfacing the thread's errors
        (after one, later jobs do not run); returns the seconds spent waiting."""
        t0 = time.perf_counter()
        while not event.wait(timeout=0.1):
            self.raise_error()
        return time.perf_counter() - t0

    def drain(self) -> float:
        """Wait for every submitted job; returns the seconds spent waiting."""
        t0 = time.perf_counter()
        self._jobs.join()
        waited = time.perf_counter() - t0
        self.raise_error()
        return waited

    def raise_error(self) -> None:
        """Re-raise, in the calling thread, the first error a job raised."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


def wait_for(event: torch.cuda.Event | None) -> None:
    """Block this thread (not the GPU) until ``event`` has happened."""
    if event is not None:
        event.synchronize()
