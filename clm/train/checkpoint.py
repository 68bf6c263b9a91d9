"""Checkpoints that survive crashes: written atomically (see :mod:`clm.files`), so the previous
checkpoint stays intact until the new one is complete (a full disk loses nothing)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from clm.errors import ClmError
from clm.files import atomic_write, reason

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(output)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(output: Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    folder = checkpoint_dir(output)
    path = folder / f"step_{step:07d}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClmError(f"{folder}: cannot create the checkpoint folder ({reason(exc)})") from None
    try:
        atomic_write(path, lambda fh: torch.save({"format": FORMAT_VERSION, **payload}, fh))
    except RuntimeError as exc:  # torch reports a failed write of its zip stream this way
        raise ClmError(f"{path}: cannot write checkpoint ({reason(exc)})") from None
    for old in list_checkpoints(output)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ClmError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # torch raises many types for a damaged zip
        raise ClmError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise ClmError(f"{path}: not a clm checkpoint (format {FORMAT_VERSION})")
    return data


def latest_checkpoint(output: Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run folder."""
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ClmError(f"{path}: no checkpoints in {checkpoint_dir(path)}")
        return found
    if not path.exists():
        raise ClmError(f"{path}: no such checkpoint or run folder")
    return path
