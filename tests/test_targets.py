"""Training images staged ahead of their step (clm.train.targets)."""

import threading
from collections import Counter

import numpy as np
import pytest
import torch

from clm.train.targets import TargetStager


class FakeImages:
    """Distinct images of a few sizes, counting reads and the threads that made them."""

    def __init__(self, count: int) -> None:
        self.reads: list[int] = []
        self.threads: list[str] = []
        rng = np.random.default_rng(0)
        self.data = [
            rng.integers(0, 256, (6 + i % 3, 5 + i % 2, 3), dtype=np.uint8) for i in range(count)
        ]

    def get(self, i: int) -> np.ndarray:
        self.reads.append(i)
        self.threads.append(threading.current_thread().name)
        return self.data[i]


def expected(images: FakeImages, batch: list[int], device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(images.data[i]).to(device).float() / 255 for i in batch]


def run_batches(device: str, batches: list[list[int]], ahead: str | None) -> FakeImages:
    """Take ``batches`` in turn; ``ahead``: prepare the next one "after" taking this one, or
    "before" it (the trainer's order), or never (None)."""
    images = FakeImages(10)
    largest = max(a.nbytes for a in images.data)
    stager = TargetStager(images, torch.device(device), len(batches[0]), largest)
    got = []
    try:
        for k, batch in enumerate(batches):
            upcoming = batches[k + 1] if k + 1 < len(batches) else None
            if device == "cuda":  # the uploads queue behind this, so buffers stay busy a while
                torch.cuda._sleep(2_000_000)
            if ahead == "before" and upcoming is not None:
                stager.prepare(upcoming)
            got.append(stager.take(batch))
            if ahead == "after" and upcoming is not None:
                stager.prepare(upcoming)
    finally:
        stager.close()
    for batch, targets in zip(batches, got, strict=True):
        for t, e in zip(targets, expected(images, batch, device), strict=True):
            assert t.shape == e.shape and t.dtype == torch.float32
            torch.testing.assert_close(t, e, rtol=0, atol=0)
    return images


BATCHES = [[0, 3, 7], [1, 2, 9], [4, 5, 6], [8, 0, 1], [2, 3, 4], [9, 7, 5]]


@pytest.mark.parametrize("ahead", [None, "after", "before"])
def test_batches_arrive_exactly(ahead):
    run_batches("cpu", BATCHES, ahead)


@pytest.mark.parametrize("ahead", ["after", "before"])
def test_batches_read_ahead_are_read_once_on_the_stager_thread(ahead):
    """Whichever order the next batch is prepared in, each image after the first batch is read
    once, by the stager's thread: none is read twice, and the caller's thread reads none
    (preparing before taking once dropped the batch read ahead and read each on the caller's
    thread)."""
    images = run_batches("cpu", BATCHES, ahead)
    assert Counter(images.reads) == Counter(i for batch in BATCHES for i in batch)
    caller = threading.current_thread().name
    by_caller = [i for i, name in zip(images.reads, images.threads, strict=True) if name == caller]
    assert sorted(by_caller) == sorted(BATCHES[0])  # nothing was read ahead of the first
    assert all(n == caller or n.startswith("clm-stage") for n in images.threads)


def test_a_batch_read_ahead_but_not_taken_is_dropped():
    images = FakeImages(10)
    stager = TargetStager(images, torch.device("cpu"), 2, 1000)
    try:
        stager.prepare([0, 1])
        targets = stager.take([2, 3])  # not the batch read ahead
        for t, e in zip(targets, expected(images, [2, 3], "cpu"), strict=True):
            torch.testing.assert_close(t, e, rtol=0, atol=0)
        stager.prepare([4, 5])
        stager.take([4, 5])
        assert images.reads.count(4) == 1  # served from the read ahead, not read again
    finally:
        stager.close()


@pytest.mark.gpu
def test_pinned_buffers_are_reused_only_after_their_upload():
    batches = [[(k * 3 + j) % 10 for j in range(3)] for k in range(40)]
    for ahead in ("after", "before"):
        run_batches("cuda", batches, ahead)


@pytest.mark.gpu
def test_batches_read_ahead_and_skipped_free_their_pinned_buffers():
    """Two batches prepared and a third taken: the buffers of the skipped ones come back, so
    nothing waits forever for a buffer (each batch holds a whole batch of them)."""
    images = FakeImages(10)
    largest = max(a.nbytes for a in images.data)
    stager = TargetStager(images, torch.device("cuda"), 3, largest)
    try:
        for first, second, taken in [
            ([0, 1, 2], [3, 4, 5], [6, 7, 8]),
            ([9, 0, 1], [2, 3, 4], [2, 3, 4]),
        ]:
            stager.prepare(first)
            stager.prepare(second)
            targets = stager.take(taken)
            for t, e in zip(targets, expected(images, taken, "cuda"), strict=True):
                torch.testing.assert_close(t, e, rtol=0, atol=0)
    finally:
        stager.close()
