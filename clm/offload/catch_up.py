"""Host rows brought up to date before the GPU reads them.

Host rows are updated lazily: a row that went unseen for some steps has not taken the
zero-gradient steps dense Adam would have applied, and the render must see them. A background
thread catches rows up in closed form:

* each micro-batch's load rows, queued as soon as the planner knows them, ahead of their gather
  (:meth:`CatchUp.loads`; the gather waits on the returned event);
* the rows the *next* batch will load, culled from the next views (:meth:`CatchUp.expect`)
  while this batch renders (:meth:`CatchUp.ahead`); most loads then find their rows ready.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from clm.model.spec import GaussianSpec
from clm.offload.culling import MAX_CAMERAS, Culler
from clm.offload.flush import record_event
from clm.offload.lazy_rows import HostRows
from clm.offload.worker import BackgroundQueue
from clm.render.base import View


class CatchUp:
    """The catch-up thread and what it is given to do (see the module docstring)."""

    def __init__(self, host: HostRows, spec: GaussianSpec, device: torch.device) -> None:
        self.host = host
        self.spec = spec
        self.device = device
        self.queue = BackgroundQueue("clm-catch-up")
        self.culler = Culler(device, chunk=1 << 22, bound=spec.cull.shape)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.waited_seconds = 0.0  # the main thread waiting for catch-ups, over the run
        self._upcoming: list[View] = []
        self._read: tuple[threading.Event, list[torch.cuda.Event]] | None = None

    def after(self, worker: BackgroundQueue) -> None:
        """Start nothing queued from now on before ``worker`` (the CPU Adam) is idle: rows are
        caught up from their last update, and tables advance in step order."""
        self.queue.submit(worker.drain)

    def expect(self, views: Sequence[View]) -> None:
        """The views of the next batch, when known."""
        self._upcoming = list(views)

    def loads(
        self, rows: Tensor, counts: Sequence[int], upto: int, width: int
    ) -> list[threading.Event]:
        """Queue the catch-up of each micro-batch's load rows (``rows`` split by ``counts``);
        returns one event per micro-batch."""
        done = [threading.Event() for _ in counts]
        start = 0
        for k, n in enumerate(counts):

            def job(lo=start, hi=start + n, event=done[k]) -> None:
                if hi > lo:
                    self.host.catch_up(rows[lo:hi], upto, width)
                event.set()

            self.queue.submit(job)
            start += n
        return done

    def wait(self, ready: threading.Event) -> None:
        """Block until ``ready`` (a load's catch-up) is set, surfacing the thread's errors."""
        t0 = time.perf_counter()
        while not ready.wait(timeout=0.1):
            self.queue.raise_error()
        self.waited_seconds += time.perf_counter() - t0

    def ahead(
        self,
        keys: dict[str, Tensor],
        views: Sequence[View],
        step: int,
        width: int,
        on_host: Callable[[Tensor], Tensor],
    ) -> None:
        """Catch up, while this step runs, the rows the next batch (:meth:`expect`) will load.

        The next views are culled against the key attributes as they are now; rows this batch
        (``views``) sees are left out (their Adam step comes from this batch's gradients), and
        ``on_host`` keeps those the host path serves. The others skip this step, so they are
        brought up to ``step`` on copies of the skip tables. A row the guess misses is caught
        up before its load as usual; one it wrongly includes was only brought forward: the
        result is the same either way.
        """
        upcoming, self._upcoming = self._upcoming, []
        if not upcoming or len(upcoming) + len(views) > MAX_CAMERAS:
            return
        args = (*self.spec.cull_inputs(keys), upcoming, views)

        def ahead(rows: Tensor) -> None:  # on the catch-up thread, after the updates it follows
            self.host.catch_up(rows, step, width, self.host.segments_ahead(step))

        if self.stream is None:  # on the CPU: cull here, deterministically
            rows = on_host(self.culler.cull_new(*args))
            self.queue.submit(lambda: ahead(rows))
            return
        # On the GPU the culling runs on its own stream, from the catch-up thread; the key Adam
        # of this step waits until it has read the key attributes (see after_reads).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        launched, read = threading.Event(), []
        self._read = (launched, read)

        def job() -> None:
            with torch.cuda.stream(self.stream):
                try:
                    fresh = on_host(self.culler.cull_new(*args))
                    read.append(record_event(self.device, self.stream))
                finally:
                    launched.set()
                rows = fresh.cpu()
            ahead(rows)

        self.queue.submit(job)

    def after_reads(self) -> None:
        """Order what follows on the compute stream after the ahead culling's reads."""
        if self._read is None:
            return
        launched, read = self._read
        self._read = None
        while not launched.wait(timeout=0.1):
            self.queue.raise_error()
        if read:
            torch.cuda.current_stream(self.device).wait_event(read[0])

    def drain(self) -> None:
        self.queue.drain()

    def close(self) -> None:
        self.queue.close()
