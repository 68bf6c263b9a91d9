"""Decoding and the on-disk image cache."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clm.data.images as images_module
from clm.data.images import ImageCache, decode_frame, locate_image, read_image_size
from clm.data.types import Distortion, Frame
from clm.data.undistort import undistorted_camera
from clm.errors import ClmError


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def frame_for(path: Path, width: int, height: int, **kwargs) -> Frame:
    return Frame(path.stem, path, width, height, np.eye(3), np.eye(4), **kwargs)


def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 7 % 256, y * 11 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = images_module.decode_frame

    def counting(frame, background):
        calls.append(frame.image_path)
        return real(frame, background)

    monkeypatch.setattr(images_module, "decode_frame", counting)
    return calls


def test_rgba_is_composited_on_the_background(tmp_path):
    rgba = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [0, 0, 0, 64]]],
        dtype=np.uint8,
    )
    frame = frame_for(save(tmp_path / "a.png", rgba), 4, 1)
    out = decode_frame(frame, (1.0, 0.5, 0.0))
    back = np.array([255.0, 127.5, 0.0])
    alpha = rgba[0, :, 3:] / 255.0
    expected = np.rint(rgba[0, :, :3] * alpha + back * (1 - alpha)).astype(np.uint8)
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[0, 1], [255, 128, 0])  # fully transparent: background
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])  # opaque: untouched


def test_gray_and_palette_images_become_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_frame(frame_for(save(tmp_path / "g.png", gray), 4, 3), (0, 0, 0))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    Image.fromarray(gray).save(tmp_path / "g16.png")
    wide = Image.fromarray(gray.astype(np.uint16) * 257)
    wide.save(tmp_path / "g16.png")
    out16 = decode_frame(frame_for(tmp_path / "g16.png", 4, 3), (0, 0, 0))
    np.testing.assert_array_equal(out16[..., 1], gray)


def test_resize_from_averages_blocks(tmp_path):
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[:2, :2] = [10, 20, 30]
    pixels[0, 0] = [50, 60, 70]  # block mean: (50 + 3 * 10) / 4 = 20
    pixels[2:, 4:] = 200
    frame = frame_for(save(tmp_path / "big.png", pixels), 3, 2, resize_from=(6, 4))
    out = decode_frame(frame, (0, 0, 0))
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [20, 30, 40])
    np.testing.assert_array_equal(out[1, 2], [200, 200, 200])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])


def test_distorted_frame_is_undistorted_to_the_frame_size(tmp_path):
    d = Distortion("SIMPLE_RADIAL", (-0.1,), 40.0, 40.0, 24.0, 16.0, 48, 32)
    k, w, h = undistorted_camera(d)
    y, x = np.mgrid[0:32, 0:48]
    ramp = np.stack([5 * x, 7 * y, np.full_like(x, 100)], axis=-1).astype(np.uint8)
    frame = frame_for(save(tmp_path / "d.png", ramp), w, h, distortion=d)
    out = decode_frame(frame, (0, 0, 0))
    assert out.shape == (h, w, 3) and (w, h) != (48, 32)
    # Next to the principal point the lens is nearly the identity, so the pixel there samples
    # the ramp where a pinhole camera would: 0.5 px from the centre at most, barely distorted.
    j, i = int(k[0, 2]), int(k[1, 2])
    source_x = d.cx + (j + 0.5 - k[0, 2]) - 0.5  # array index in the distorted image
    source_y = d.cy + (i + 0.5 - k[1, 2]) - 0.5
    np.testing.assert_allclose(out[i, j], [5 * source_x, 7 * source_y, 100], atol=1.0)


def test_wrong_size_at_decode_time(tmp_path):
    frame = frame_for(save(tmp_path / "a.png", gradient(5, 7)), 8, 5)
    with pytest.raises(ClmError, match=r"a\.png: image is 7x5, expected 8x5"):
        decode_frame(frame, (0, 0, 0))


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_image_names_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # a PNG cut short: the header reads, the pixels do not
        save(path, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(ClmError, match=r"bad\.png: ") as info:
        ImageCache([frame_for(path, 64, 64)], tmp_path / "cache", (0, 0, 0)).get(0)
    assert "\n" not in str(info.value)


def test_read_image_size(tmp_path):
    assert read_image_size(save(tmp_path / "a.png", gradient(5, 7))) == (7, 5)
    with pytest.raises(ClmError, match=r"missing\.png: image not found"):
        read_image_size(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 junk")
    with pytest.raises(ClmError, match=r"junk\.jpg: not a readable image"):
        read_image_size(tmp_path / "junk.jpg")


def test_locate_image_prefers_the_factor_folder(tmp_path):
    save(tmp_path / "images" / "a.png", gradient(40, 60))
    save(tmp_path / "images_2" / "a.png", gradient(20, 30))
    path, size, resize_from = locate_image(tmp_path / "images", "a.png", 2, (60, 40))
    assert (path, size, resize_from) == (tmp_path / "images_2" / "a.png", (30, 20), None)
    path, size, resize_from = locate_image(tmp_path / "images", "a.png", 4, (60, 40))
    assert (path, size, resize_from) == (tmp_path / "images" / "a.png", (15, 10), (60, 40))


def test_cache_decodes_once_across_instances(tmp_path, count_decodes):
    path = save(tmp_path / "a.png", gradient(6, 9))
    frames = [frame_for(path, 9, 6)]
    cache = ImageCache(frames, tmp_path / "cache", (0, 0, 0))
    first = cache.get(0)
    second = cache.get(0)
    assert len(count_decodes) == 1
    assert isinstance(second, np.memmap) and not second.flags.writeable
    np.testing.assert_array_equal(first, gradient(6, 9))
    np.testing.assert_array_equal(second, gradient(6, 9))
    again = ImageCache(frames, tmp_path / "cache", (0, 0, 0))  # a second run
    np.testing.assert_array_equal(again.get(0), gradient(6, 9))
    assert len(count_decodes) == 1
    assert not list((tmp_path / "cache").glob(".decode-*"))  # no temporary files left


def test_cache_entries_do_not_collide(tmp_path, count_decodes):
    path = save(tmp_path / "a.png", gradient(8, 12))
    d = Distortion("RADIAL", (0.05, 0.0), 10.0, 10.0, 6.0, 4.0, 12, 8)
    _, dw, dh = undistorted_camera(d)
    variants = [
        frame_for(path, 12, 8),
        frame_for(path, 6, 4, resize_from=(12, 8)),
        frame_for(path, 3, 2, resize_from=(12, 8)),
        frame_for(path, dw, dh, distortion=d),
    ]
    results = [ImageCache([f], tmp_path / "cache", (0, 0, 0)).get(0).shape for f in variants]
    assert results == [(8, 12, 3), (4, 6, 3), (2, 3, 3), (dh, dw, 3)]
    assert len(count_decodes) == 4
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    # Another background is another entry too (it changes transparent images).
    ImageCache(variants[:1], tmp_path / "cache", (1, 1, 1)).get(0)
    assert len(count_decodes) == 5


def test_edited_image_is_decoded_again(tmp_path, count_decodes):
    path = save(tmp_path / "a.png", gradient(6, 9))
    frames = [frame_for(path, 9, 6)]
    ImageCache(frames, tmp_path / "cache", (0, 0, 0)).get(0)
    save(path, 255 - gradient(6, 9))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    out = ImageCache(frames, tmp_path / "cache", (0, 0, 0)).get(0)
    np.testing.assert_array_equal(out, 255 - gradient(6, 9))
    assert len(count_decodes) == 2


def test_damaged_cache_entry_is_replaced(tmp_path, count_decodes):
    path = save(tmp_path / "a.png", gradient(6, 9))
    cache = ImageCache([frame_for(path, 9, 6)], tmp_path / "cache", (0, 0, 0))
    cache.get(0)
    (entry,) = (tmp_path / "cache").glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:40])
    np.testing.assert_array_equal(cache.get(0), gradient(6, 9))
    assert len(count_decodes) == 2


def test_concurrent_gets_decode_once(tmp_path, monkeypatch):
    path = save(tmp_path / "a.png", gradient(6, 9))
    calls = []
    real = images_module.decode_frame

    def slow(frame, background):
        calls.append(1)
        time.sleep(0.05)
        return real(frame, background)

    monkeypatch.setattr(images_module, "decode_frame", slow)
    cache = ImageCache([frame_for(path, 9, 6)], tmp_path / "cache", (0, 0, 0))
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(0))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 8
    for r in results:
        np.testing.assert_array_equal(r, gradient(6, 9))


def test_cache_entries_are_opened_one_at_a_time(tmp_path, monkeypatch):
    """np.load parses a header with ast, which CPython 3.11 cannot do in two threads at once
    (a SystemError seen in CI); entries read by many threads are opened one after another."""
    path = save(tmp_path / "a.png", gradient(6, 9))
    frames = [frame_for(path, 9, 6)]
    ImageCache(frames, tmp_path / "cache", (0, 0, 0)).get(0)  # the entry exists
    real, active, most = np.load, [0], [0]

    def watched(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.02)
        try:
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(np, "load", watched)
    results = []

    def read() -> None:
        results.append(ImageCache(frames, tmp_path / "cache", (0, 0, 0)).get(0))

    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and most[0] == 1
    for r in results:
        np.testing.assert_array_equal(r, gradient(6, 9))


def test_prefetch_decodes_in_the_background(tmp_path, count_decodes):
    frames = [frame_for(save(tmp_path / f"{i}.png", gradient(4, 5) + i), 5, 4) for i in range(3)]
    with ImageCache(frames, tmp_path / "cache", (0, 0, 0)) as cache:
        cache.prefetch([2, 0, 1, 2])
        deadline = time.time() + 10
        while len(list((tmp_path / "cache").glob("*.npy"))) < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert len(count_decodes) == 3
        for i in range(3):
            np.testing.assert_array_equal(cache.get(i), gradient(4, 5) + i)
        assert len(count_decodes) == 3
    with pytest.raises(RuntimeError):
        cache.prefetch([0])


def test_prefetch_is_bounded(tmp_path, monkeypatch):
    frames = [frame_for(save(tmp_path / f"{i}.png", gradient(4, 5)), 5, 4) for i in range(20)]
    release = threading.Event()
    calls = []
    real = images_module.decode_frame

    def blocked(frame, background):
        calls.append(frame.image_path)
        release.wait(10)
        return real(frame, background)

    monkeypatch.setattr(images_module, "decode_frame", blocked)
    cache = ImageCache(frames, tmp_path / "cache", (0, 0, 0), workers=1)
    cache.prefetch(range(20))  # returns at once although the decoder is blocked
    release.set()
    deadline = time.time() + 10
    while len(list((tmp_path / "cache").glob("*.npy"))) < 4 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    cache.close()
    assert len(calls) == 4  # 4 x workers queued at most; the rest left to later calls
    cache_files = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npy"))
    assert cache_files == ["0", "1", "2", "3"]


def test_prefetch_failure_surfaces_in_get(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"garbage")
    with ImageCache([frame_for(path, 4, 4)], tmp_path / "cache", (0, 0, 0)) as cache:
        cache.prefetch([0])
        with pytest.raises(ClmError, match=r"bad\.png: cannot decode image"):
            cache.get(0)
