"""Writing files so that a crash, Ctrl-C or a full disk never leaves half a file in place:
everything goes to a temporary file beside the target, is synced, then renamed over it."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from clm.errors import ClmError


def size_text(nbytes: float) -> str:
    """Bytes as GB, or MB below one GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def atomic_write(
    path: Path, write: Callable[[BinaryIO], object], needed: int | None = None
) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place.

    An OS error (unwritable folder, full disk) becomes a one-line :class:`ClmError` naming
    ``path``; the previous file, if any, is left untouched. ``needed``: the file's expected
    size in bytes (at most), for the message when the disk fills.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise ClmError(f"{path}: cannot write in folder {path.parent} ({reason(exc)})") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.exists() else 0
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            size = f"up to {size_text(needed)} needed; " if needed is not None else ""
            raise ClmError(
                f"{path}: no space left on {path.parent} ({size}the disk filled after "
                f"{size_text(written)}; {size_text(free)} free now); the previous file is intact"
            ) from None
        if isinstance(exc, OSError):
            raise ClmError(f"{path}: write failed ({reason(exc)})") from None
        raise


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def save_png(path: Path, image: np.ndarray | Image.Image) -> None:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    atomic_write(path, lambda fh: picture.save(fh, format="PNG"))
