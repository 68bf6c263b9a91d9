"""What a run sets up before it trains: its output folder, its file log, its random seeds."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from clm.errors import ClmError
from clm.train.checkpoint import list_checkpoints


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cpu":
        # Some CPU backward kernels (advanced-indexing accumulation) race between threads;
        # their deterministic variants cost nothing measurable here.
        torch.use_deterministic_algorithms(True)


def prepare_output(output: Path, resuming: bool) -> None:
    """Create the output folder, and refuse to start a fresh run over an existing one."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ClmError(f"{output}: output folder is not writable ({exc.strerror})") from None
    if not resuming and list_checkpoints(output):
        raise ClmError(
            f"{output} already holds a run; pass --resume to continue it or choose another --output"
        )


def attach_file_log(output: Path) -> logging.Handler:
    handler = logging.FileHandler(output / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("clm").addHandler(handler)
    logging.getLogger("clm").setLevel(logging.INFO)
    return handler


def detach_file_log(handler: logging.Handler) -> None:
    logging.getLogger("clm").removeHandler(handler)
    handler.close()
