"""``--max-host-gb`` covers everything the process holds in host memory, not only the offloaded
rows: the plan counts what the process already holds (libraries, CUDA context, the scene), the
fixed buffers training adds (pinned staging, image staging, streaming blocks) and the bytes of
each Gaussian, and says before training how many Gaussians fit, so a run that cannot fit is
refused at the start instead of dying mid-run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from clm.errors import ClmError
from clm.offload.host_store import HOST_RESERVE_BYTES, available_host_bytes

GIB = 1 << 30


def process_rss() -> int:
    """Resident bytes of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class HostPlan:
    budget: int  # bytes the process may hold in all
    fixed: int  # what it holds whatever the model's size
    per_gaussian: int
    max_gaussians: int
    capped: bool  # True: --max-host-gb; False: what the OS has available

    @property
    def rows_bytes(self) -> int:
        """What is left for per-Gaussian memory."""
        return max(0, self.budget - self.fixed)

    def describe(self) -> str:
        what = "host budget" if self.capped else "host memory available"
        return (
            f"{what} {self.budget / GIB:.1f} GiB: up to {self.max_gaussians / 1e6:.2f}M "
            f"Gaussians at {self.per_gaussian} B each, after {self.fixed / GIB:.1f} GiB fixed "
            "(process, staging and streaming buffers)"
        )

    def check(self, count: int) -> None:
        if count > self.max_gaussians:
            flag = "--max-host-gb" if self.capped else "host memory"
            raise ClmError(
                f"the model has {count / 1e6:.2f}M Gaussians but {flag} "
                f"({self.budget / GIB:.1f} GiB) holds at most {self.max_gaussians / 1e6:.2f}M "
                f"at {self.per_gaussian} B each"
            )


def plan_host(per_gaussian: int, buffers: int, max_host_bytes: int | None) -> HostPlan:
    """How many Gaussians of ``per_gaussian`` host bytes fit, given fixed ``buffers`` on top of
    what the process holds now; the budget is ``max_host_bytes`` or, without one, the memory the
    OS reports available (less a reserve) plus what the process already holds."""
    held = process_rss()
    if max_host_bytes is None:
        free = available_host_bytes()
        budget = held + (free - HOST_RESERVE_BYTES if free is not None else 1 << 50)
    else:
        budget = max_host_bytes
    fixed = held + buffers
    most = max(0, budget - fixed) // per_gaussian if per_gaussian else 1 << 62
    return HostPlan(budget, fixed, per_gaussian, int(most), max_host_bytes is not None)
