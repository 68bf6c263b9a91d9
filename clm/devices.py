"""The torch device a command or an engine runs on."""

from __future__ import annotations

import torch

from clm.errors import ClmError


def with_index(device: torch.device) -> torch.device:
    """``device``, with the current CUDA device's index when it names none (CUDA's memory APIs
    want one)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_device(name: str | None) -> torch.device:
    """The device of ``--device``: ``auto`` (or None) is CUDA when there is a GPU, else the CPU;
    ``cpu``, ``cuda`` or ``cuda:N`` otherwise. Anything else, or CUDA without a GPU, is a
    ClmError."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ClmError(f"--device {name!r}: expected auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ClmError(f"--device {name!r}: expected auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClmError(f"--device {name}: CUDA is not available on this machine")
    return with_index(device)
