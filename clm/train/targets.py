"""Training images for the next batch, read on a background thread into reused pinned buffers.

Reading a 1080p image out of the memory-mapped cache and pinning it costs milliseconds of host
time; done on the main thread between steps, the GPU idles for all of it. Here a thread copies
the next batch's images into pinned buffers while the current step runs, and the main thread
only queues their asynchronous uploads. A buffer is refilled only after the upload that read it
has finished on the GPU.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from clm.data.images import ImageCache
from clm.data.types import Frame


class _Buffer:
    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.uploaded: torch.cuda.Event | None = None  # the last upload that read it


class TargetStager:
    """``prepare(batch)`` starts reading a batch ahead; ``take(batch)`` returns its images on
    the device as float ``[H, W, 3]`` in [0, 1]. Two batches of buffers circulate: one being
    uploaded, one being filled."""

    def __init__(
        self, images: ImageCache, device: torch.device, batch_size: int, max_bytes: int
    ) -> None:
        self.images = images
        self.device = device
        self.cuda = device.type == "cuda"
        self._free: queue.Queue[_Buffer] = queue.Queue()
        if self.cuda:
            for _ in range(2 * batch_size):
                self._free.put(_Buffer(max_bytes, pinned=True))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="clm-stage")
        self._pending: dict[tuple[int, ...], Future] = {}

    @classmethod
    def for_frames(
        cls, images: ImageCache, device: torch.device, batch_size: int, frames: Sequence[Frame]
    ) -> TargetStager:
        """A stager whose buffers hold the largest of ``frames`` (8-bit RGB)."""
        return cls(images, device, batch_size, max(f.width * f.height * 3 for f in frames))

    def _read(self, batch: tuple[int, ...]) -> list[tuple[Tensor, _Buffer | None]]:
        out = []
        for i in batch:
            image = self.images.get(i)
            if not self.cuda:
                out.append((torch.from_numpy(np.array(image)), None))
                continue
            buffer = self._free.get()
            if buffer.uploaded is not None:
                buffer.uploaded.synchronize()
            staged = buffer.data[: image.nbytes].view(image.shape)
            np.copyto(staged.numpy(), image)
            out.append((staged, buffer))
        return out

    def prepare(self, batch: list[int]) -> None:
        """Start reading ``batch``; before or after taking the batch before it (the trainer
        prepares the next batch first, then takes this one)."""
        key = tuple(batch)
        if key in self._pending:
            return
        while len(self._pending) >= 2:  # two batches of buffers: the oldest read ahead goes
            self._release(self._pending.pop(next(iter(self._pending))))
        self._pending[key] = self._pool.submit(self._read, key)

    def _release(self, read: Future) -> None:
        """Give back the buffers of a batch read ahead that will not be taken."""
        for _, buffer in read.result():
            if buffer is not None:
                self._free.put(buffer)

    def take(self, batch: list[int]) -> list[Tensor]:
        key = tuple(batch)
        # Batches read ahead before this one did not come: their buffers go back. The one
        # read ahead last is kept when this batch was not read ahead (the trainer prepares
        # the next batch before taking this one), which leaves a batch of buffers to read it.
        order = list(self._pending)
        stale = order[: order.index(key)] if key in self._pending else order[:-1]
        for other in stale:
            self._release(self._pending.pop(other))
        future = self._pending.pop(key, None)
        staged = future.result() if future is not None else self._read(key)
        targets = []
        for image, buffer in staged:
            targets.append(image.to(self.device, non_blocking=True).float().div_(255.0))
            if buffer is not None:
                buffer.uploaded = torch.cuda.Event()
                buffer.uploaded.record()
                self._free.put(buffer)
        return targets

    def close(self) -> None:
        """Drop batches read ahead (their buffers with them) and stop the thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
