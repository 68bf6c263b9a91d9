"""An H.264 video written one frame at a time, so a long camera path never sits in memory.

It needs imageio and imageio-ffmpeg (the optional ``clm[video]`` extra, which brings its own
ffmpeg). The file appears under its name only once complete; until then it is a hidden
``.NAME.partial.mp4`` next to it, removed if rendering fails. A folder that cannot be made or
an ffmpeg that cannot write (say, a full disk) is a ClmError.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from clm.errors import ClmError

#: Output names that mean a video rather than a folder of frames.
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _imageio() -> Any:
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401 (the ffmpeg binary imageio writes through)
    except ImportError as exc:
        raise ClmError(
            "writing a video needs imageio and imageio-ffmpeg: pip install clm[video]"
        ) from exc
    return imageio


class VideoWriter:
    """Frames (uint8 ``[H, W, 3]``, all one size) into ``path`` at ``fps``."""

    def __init__(self, path: Path, fps: float) -> None:
        imageio = _imageio()
        self.path = path
        self.partial = path.with_name(f".{path.stem}.partial{path.suffix}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClmError(
                f"{path}: cannot create the folder {exc.filename or path.parent} "
                f"({exc.strerror or exc})"
            ) from None
        # yuv420p plays everywhere; it needs even sides (ffmpeg rounds odd ones up).
        self._writer = imageio.get_writer(
            self.partial,
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=8,
            macro_block_size=2,
        )
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        try:
            self._writer.append_data(frame)
        except OSError as exc:  # ffmpeg quit (a full disk, a folder gone)
            raise self._failed(exc) from None
        self.frames += 1

    def _failed(self, exc: BaseException | None = None) -> ClmError:
        why = f" ({str(exc).splitlines()[0]})" if exc is not None and str(exc) else ""
        return ClmError(
            f"{self.path}: ffmpeg could not write the video{why}; see its messages above"
        )

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._writer.close()
        except OSError as closing:
            if exc_type is None:
                self._discard()
                raise self._failed(closing) from None
        if exc_type is not None:  # rendering failed: that error goes on
            self._discard()
        elif not self.partial.is_file():
            raise self._failed()
        else:
            self.partial.replace(self.path)

    def _discard(self) -> None:
        if self.partial.is_file():
            self.partial.unlink()
