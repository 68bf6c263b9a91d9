"""Training images staged ahead of their step (clm.train.targets)."""

import numpy as np
import pytest
import torch

from clm.train.targets import TargetStager


class FakeImages:
    """Distinct images of a few sizes, counting reads."""

    def __init__(self, count: int) -> None:
        self.reads: list[int] = []
        rng = np.random.default_rng(0)
        self.data = [
            rng.integers(0, 256, (6 + i % 3, 5 + i % 2, 3), dtype=np.uint8) for i in range(count)
        ]

    def get(self, i: int) -> np.ndarray:
        self.reads.append(i)
        return self.data[i]


def expected(images: FakeImages, batch: list[int], device: str) -> list[torch.Tensor]:
    return [torch.from_numpy(images.data[i]).to(device).float() / 255 for i in batch]


def run_batches(device: str, batches: list[list[int]], ahead: bool) -> None:
    images = FakeImages(10)
    largest = max(a.nbytes for a in images.data)
    stager = TargetStager(images, torch.device(device), len(batches[0]), largest)
    got = []
    try:
        for k, batch in enumerate(batches):
            if device == "cuda":  # the uploads queue behind this, so buffers stay busy a while
                torch.cuda._sleep(2_000_000)
            got.append(stager.take(batch))
            if ahead and k + 1 < len(batches):
                stager.prepare(batches[k + 1])
    finally:
        stager.close()
    for batch, targets in zip(batches, got, strict=True):
        for t, e in zip(targets, expected(images, batch, device), strict=True):
            assert t.shape == e.shape and t.dtype == torch.float32
            torch.testing.assert_close(t, e, rtol=0, atol=0)


BATCHES = [[0, 3, 7], [1, 2, 9], [4, 5, 6], [8, 0, 1], [2, 3, 4], [9, 7, 5]]


@pytest.mark.parametrize("ahead", [False, True])
def test_batches_arrive_exactly(ahead):
    run_batches("cpu", BATCHES, ahead)


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
    run_batches("cuda", batches, ahead=True)
