"""An H.264 video written one frame at a time, so a long camera path never sits in memory.

It needs imageio and imageio-ffmpeg (the optional ``clm[video]`` extra, which brings its own
ffmpeg). The file appears under its name only once complete; until then it is a hidden
``.NAME.partial.mp4`` next to it, removed if rendering fails.
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
        path.parent.mkdir(parents=True, exist_ok=True)
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
        self._writer.append_data(frame)
        self.frames += 1

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._writer.close()
        if exc_type is None:
            self.partial.replace(self.path)
        else:
            self.partial.unlink(missing_ok=True)
