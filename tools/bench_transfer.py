"""PCIe figures of the offload path on this machine: the zero-copy gather of host rows at each
SH degree's width, the gradient download, and culling throughput. Prints a Markdown table.

  python tools/bench_transfer.py [--rows 20e6] [--visible 4e6]
"""

from __future__ import annotations

import argparse
import time

import torch

from clm.offload.culling import Culler
from clm.offload.gather import RowGather
from clm.offload.host_store import HostStore
from clm.render.base import View


def timed(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=20e6)
    parser.add_argument("--visible", type=float, default=4e6)
    args = parser.parse_args()
    device = torch.device("cuda")
    n, m = int(args.rows), int(args.visible)
    store = HostStore(48, pinned=True)
    for start in range(0, n, 1 << 22):
        store.append(torch.randn(min(1 << 22, n - start), 48), step=0)
    gather = RowGather(store, device)
    # The engine loads each view's new rows in ascending order; random order is the worst case.
    sorted_rows = torch.sort(torch.randperm(n, device=device)[:m]).values
    shuffled = torch.randperm(n, device=device)[:m]
    slots = torch.arange(m, device=device)
    out = torch.empty(m, 48, device=device)
    grad = torch.empty(m, 48, device=device)
    results = []
    for order, rows in (("ascending", sorted_rows), ("shuffled", shuffled)):
        for degree, width in enumerate((3, 12, 27, 48)):
            t = timed(lambda w=width, r=rows: gather.gather(r, slots, w, out, grad))
            results.append(
                (
                    f"gather {m / 1e6:.0f}M of {n / 1e6:.0f}M rows ({order}), SH degree {degree}"
                    f" ({width} floats)",
                    f"{m / t / 1e6:.0f} M rows/s",
                    f"{m * width * 4 / t / 1e9:.1f} GB/s",
                )
            )
    pinned = torch.empty(m, 48, pin_memory=True)
    t = timed(lambda: pinned.copy_(out, non_blocking=True))
    results.append(
        (
            f"gradient download, {m / 1e6:.0f}M x 48 floats",
            f"{m / t / 1e6:.0f} M rows/s",
            f"{m * 192 / t / 1e9:.1f} GB/s",
        )
    )
    means = (torch.rand(n, 3, device=device) - 0.5) * 100
    scales = torch.full((n, 3), -3.0, device=device)
    opac = torch.zeros(n, device=device)
    views = []
    for i in range(16):
        vm = torch.eye(4, device=device)
        vm[0, 3] = i - 8.0
        vm[2, 3] = 30.0
        K = torch.tensor([[1000.0, 0, 960], [0, 1000.0, 540], [0, 0, 1]], device=device)
        views.append(View(vm, K, 1920, 1080))
    culler = Culler(device)
    t = timed(lambda: culler.cull(means, scales, opac, views))
    results.append(
        (
            f"cull {n / 1e6:.0f}M Gaussians x 16 cameras",
            f"{n / t / 1e6:.0f} M Gaussians/s",
            f"{t * 1e3:.1f} ms",
        )
    )
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| what | rate | bandwidth / time |\n|---|---|---|")
    for row in results:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
