"""Decode each training image once, keep it on disk as .npy and hand out memory maps.

Decoding a JPEG, compositing, resizing and undistorting costs far more than a training step
needs; doing it once per scene (and never again in later runs) and reading the result
through the page cache means thousands of large images never sit in RAM together.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from clm.data.types import Frame
from clm.data.undistort import undistort_image
from clm.errors import ClmError

_LOCK_STRIPES = 64
# np.load parses a .npy header with ast.literal_eval, and CPython 3.11 builds ASTs with state
# shared between threads: two threads parsing at once can fail with "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905). Headers are read one at a time.
_NPY_HEADER_LOCK = threading.Lock()


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header alone, without decoding its pixels."""
    if not path.is_file():
        raise ClmError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as exc:  # PIL raises many types for unreadable files
        raise ClmError(f"{path}: not a readable image ({_one_line(exc)})") from exc


def locate_image(
    folder: Path, name: str, data_factor: int, camera_size: tuple[int, int] | None
) -> tuple[Path, tuple[int, int], tuple[int, int] | None]:
    """Find ``name`` for a data factor and check its size: (path, decoded size, resize_from).

    With factor F > 1, ``<folder>_F/name`` is used when that folder exists and must be the
    camera's size / F (give or take the 1 px that rounding may cost); otherwise
    ``folder/name`` must be the camera's size, and is decoded at size / F rounded half up, which is
    what ``resize_from`` (the file's own (width, height)) asks of the decoder.
    ``camera_size`` None (a format without one) accepts the file's own size.
    """
    reduced = folder.with_name(f"{folder.name}_{data_factor}")
    if data_factor > 1 and reduced.is_dir():
        path = reduced / name
        size = read_image_size(path)
        _check_size(path, size, camera_size, data_factor)
        return path, size, None
    path = folder / name
    size = read_image_size(path)
    _check_size(path, size, camera_size, 1)
    if data_factor == 1:
        return path, size, None
    # Half up, not Python's round-half-to-even: 7.5 px becomes 8 whatever the neighbours.
    target = (max(1, int(size[0] / data_factor + 0.5)), max(1, int(size[1] / data_factor + 0.5)))
    return path, target, size


def _check_size(
    path: Path, size: tuple[int, int], camera_size: tuple[int, int] | None, factor: int
) -> None:
    if camera_size is None:
        return
    expected = (camera_size[0] / factor, camera_size[1] / factor)
    if abs(size[0] - expected[0]) > 1 or abs(size[1] - expected[1]) > 1:
        shown = "x".join(f"{v:g}" for v in expected)
        how = f" (the camera's {camera_size[0]}x{camera_size[1]} / {factor})" if factor > 1 else ""
        raise ClmError(f"{path}: image is {size[0]}x{size[1]}, expected {shown}{how}")


def decode_frame(frame: Frame, background: tuple[float, float, float]) -> np.ndarray:
    """The frame's image as trained: uint8 [height, width, 3].

    Transparency is composited onto ``background`` (RGB in 0..1) before resizing, so the
    transparent pixels' hidden colours never bleed into the edges; the resize (to the
    distorted size when there is a distortion) comes before undistortion because the
    Distortion describes the resized image.
    """
    d = frame.distortion
    target = (d.width, d.height) if d else (frame.width, frame.height)
    expected = frame.resize_from or target
    path = frame.image_path
    if not path.is_file():
        raise ClmError(f"{path}: image not found")
    try:
        with Image.open(path) as image:
            if image.size != expected:
                raise ClmError(
                    f"{path}: image is {image.size[0]}x{image.size[1]}, "
                    f"expected {expected[0]}x{expected[1]}"
                )
            rgb = _composited(image, background)
    except ClmError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ClmError(f"{path}: cannot decode image ({_one_line(exc)})") from exc
    if target != expected:
        shrinking = target[0] < expected[0]
        method = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
        rgb = np.asarray(Image.fromarray(rgb).resize(target, method))
    if d is not None:
        rgb = undistort_image(rgb, d)
    if rgb.shape != (frame.height, frame.width, 3):
        raise ClmError(
            f"{path}: decoded to {rgb.shape[1]}x{rgb.shape[0]}, "
            f"the camera expects {frame.width}x{frame.height}"
        )
    return np.ascontiguousarray(rgb)


class ImageCache:
    """Frames' decoded images, stored once in ``cache_dir`` and served as read-only memory maps.

    Each entry's name hashes the source file (path, size, modification time) and everything
    that shapes the result (output size, resize, distortion, background), so another data
    factor or an edited image never reuses a stale entry. Entries are written to a temporary
    file and renamed into place, so a crash or a concurrent run never leaves a half-written one.
    """

    def __init__(
        self,
        frames: Sequence[Frame],
        cache_dir: Path,
        background: tuple[float, float, float],
        workers: int = 2,
    ) -> None:
        self.frames = list(frames)
        self.cache_dir = Path(cache_dir)
        self.background = tuple(float(c) for c in background)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClmError(f"{cache_dir}: cannot create the image cache ({exc.strerror})") from exc
        self._workers = max(1, workers)
        self._max_pending = 4 * self._workers
        self._entries: dict[int, Path] = {}
        self._guard = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._closed = False

    def get(self, i: int) -> np.ndarray:
        """Frame ``i``'s image, uint8 [height, width, 3], memory-mapped read-only."""
        entry = self._entry(i)
        image = self._load(i, entry)
        if image is not None:
            return image
        with self._stripes[i % _LOCK_STRIPES]:
            image = self._load(i, entry)  # another thread may have finished it meanwhile
            if image is None:
                self._store(entry, decode_frame(self.frames[i], self.background))
                image = self._load(i, entry)
        if image is None:
            raise ClmError(f"{entry}: cache entry unreadable right after writing it")
        return image

    def prefetch(self, indices: Iterable[int]) -> None:
        """Start decoding the given frames in the background, in order, without blocking.

        At most a few decodes are queued at once; indices beyond that are skipped and will
        be decoded by a later prefetch or by :meth:`get`. A failed decode is not reported
        here: :meth:`get` decodes again and raises in the caller's thread.
        """
        if self._closed:
            raise RuntimeError("ImageCache.prefetch after close()")
        with self._guard:
            self._pending = {i: f for i, f in self._pending.items() if not f.done()}
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="clm-decode")
            for i in indices:
                if len(self._pending) >= self._max_pending:
                    break
                if i in self._pending or self._is_stored(i):
                    continue
                self._pending[i] = self._pool.submit(self.get, i)

    def close(self) -> None:
        """Stop the background decoders, dropping queued work and waiting for running work."""
        self._closed = True
        with self._guard:
            pool, self._pool = self._pool, None
            self._pending = {}
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _entry(self, i: int) -> Path:
        with self._guard:
            return self._entry_locked(i)

    def _entry_locked(self, i: int) -> Path:
        entry = self._entries.get(i)
        if entry is None:
            entry = self._entries[i] = self.cache_dir / self._entry_name(self.frames[i])
        return entry

    def _is_stored(self, i: int) -> bool:
        try:
            return self._entry_locked(i).is_file()
        except ClmError:
            return False  # a missing source: get() will report it

    def _entry_name(self, frame: Frame) -> str:
        try:
            stat = frame.image_path.stat()
        except OSError as exc:
            raise ClmError(f"{frame.image_path}: image not found ({exc.strerror})") from exc
        identity = repr(
            (
                str(frame.image_path.resolve()),
                stat.st_size,
                stat.st_mtime_ns,
                frame.width,
                frame.height,
                frame.resize_from,
                frame.distortion,
                self.background,
            )
        )
        digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", frame.image_path.stem)[:60]
        return f"{stem}-{digest}.npy"

    def _load(self, i: int, entry: Path) -> np.ndarray | None:
        """The memory-mapped entry, or None when it is missing or not what this frame needs."""
        frame = self.frames[i]
        try:
            with _NPY_HEADER_LOCK:  # (the pixels are read later, through the mapping)
                image = np.load(entry, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if image.dtype != np.uint8 or image.shape != (frame.height, frame.width, 3):
            return None
        return image

    def _store(self, entry: Path, image: np.ndarray) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".decode-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, image, allow_pickle=False)
                os.replace(tmp, entry)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise ClmError(f"{self.cache_dir}: cannot write the image cache ({exc})") from exc


def _composited(image: Image.Image, background: tuple[float, float, float]) -> np.ndarray:
    """RGB uint8 pixels of an opened image, with any transparency over ``background``."""
    if image.mode.startswith("I;16"):
        gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if "A" not in image.getbands() and "transparency" not in image.info:
        return np.asarray(image.convert("RGB"))
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    back = np.asarray(background, dtype=np.float32) * 255.0
    out = rgba[..., :3] * alpha + back * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
