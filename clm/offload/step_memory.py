"""What a run's first training steps take of GPU memory.

The planner sizes the row cache and the render workspace for the worst case of each cost (every
cached row rendered at once, every row in a batch), and gives the resident rows what is left of
that. Training takes less: at 40M Gaussians under 24 GiB the planned budget was full and the
steps peaked at 12.6 GiB. These figures let the resident rows take the difference
(:meth:`clm.offload.resident_rows.ResidentBudget.measured`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MEASURED_STEPS = 3  # steps measured before the resident set is sized from them


def cuda_allocated(device: torch.device) -> tuple[int, int]:
    """Bytes the caching allocator holds for tensors now, and the most it has held."""
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


class StepMemory:
    """Measures the first ``steps`` training steps: what stays allocated between steps, and the
    most a step allocates beyond what was held before the first.

    The most is read from the allocator's peak since its last reset, which may come from before
    the first step (loading the model): then it overstates what a step takes, which only keeps
    more memory free."""

    def __init__(
        self,
        device: torch.device,
        steps: int = MEASURED_STEPS,
        read: Callable[[torch.device], tuple[int, int]] = cuda_allocated,
    ) -> None:
        self.device, self.left, self.read = device, steps, read
        self.before: int | None = None

    def start(self) -> None:
        """Before a measured step (only the first one's holdings count)."""
        if self.before is None:
            self.before = self.read(self.device)[0]

    def finish(self) -> tuple[int, int] | None:
        """After a measured step: None until the last, then ``(held, step_most)`` in bytes."""
        assert self.before is not None, "start() comes first"
        self.left -= 1
        if self.left > 0:
            return None
        held, peak = self.read(self.device)
        return held, max(0, peak - self.before)
