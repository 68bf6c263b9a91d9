"""Forward and backward time and peak RSS of the CPU rasterizers: native C vs pure torch.

Each case renders random screen-space ellipses (σ 0.5-3.5 px, one in ten six times larger) with
random opacities and depths, then backpropagates a random weighting of image and alpha. Every
(size, rasterizer) case runs in its own process so its peak RSS is its own; times are the
median of ``--repeat`` runs after one warm-up. The torch rasterizer is skipped where its
(pixel, Gaussian) pairs exceed ``--torch-max-pairs`` (it holds several tensors per pair).

    python tools/bench_cpu_raster.py [--sizes 3000x96x72,30000x160x120,...] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import Tensor

SIZES = "3000x96x72,30000x160x120,100000x320x240,1000000x128x96"  # Gaussians x width x height


def scene(n: int, width: int, height: int) -> tuple[Tensor, ...]:
    """means2d, conics, colors, opacities, depths and radii of n random ellipses."""
    g = torch.Generator().manual_seed(0)
    means2d = torch.rand(n, 2, generator=g) * torch.tensor([width * 1.1, height * 1.1]) - 2.0
    scale = torch.rand(n, 2, generator=g) * 3.0 + 0.5
    scale[: n // 10] *= 6.0
    angle = torch.rand(n, generator=g) * torch.pi
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([c, -s, s, c], -1).reshape(n, 2, 2)
    cov = rot @ torch.diag_embed(scale**2) @ rot.transpose(1, 2) + 0.3 * torch.eye(2)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1)
    opacities = torch.rand(n, generator=g)
    extend = torch.sqrt(2 * torch.log(opacities.clamp_min(1 / 255) * 255)).clamp_max(3.33)
    radii = torch.ceil(extend[:, None] * torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2)))
    return (
        means2d,
        conics,
        torch.rand(n, 3, generator=g),
        opacities,
        torch.rand(n, generator=g),
        radii.to(torch.int32),
    )


def box_pairs(means2d: Tensor, radii: Tensor, width: int, height: int) -> int:
    """(pixel, Gaussian) pairs of the bounding boxes: what the torch rasterizer materialises."""
    lo = torch.floor(means2d - radii) - 1
    hi = torch.ceil(means2d + radii) + 1
    size = torch.tensor([width, height])
    extent = (torch.minimum(hi, size) - torch.maximum(lo, torch.zeros(2))).clamp_min(0)
    return int(extent.prod(-1).sum())


def run_case(kind: str, n: int, width: int, height: int, repeat: int) -> dict[str, float]:
    """Times one rasterizer in this process; returns milliseconds and peak RSS in MiB."""
    if kind == "native":
        from clm.render.native_raster import rasterize, usable

        if not usable():
            raise SystemExit("the native rasterizer could not be built")
    else:
        from clm.render.torch_rasterizer import rasterize
    data = scene(n, width, height)
    background = torch.tensor([0.1, 0.2, 0.3])
    weights = torch.rand(height, width, 3), torch.rand(height, width, 1)
    forward, backward = [], []
    for _ in range(repeat + 1):
        leaves = [t.clone().requires_grad_() for t in data[:4]]
        start = time.perf_counter()
        image, alpha = rasterize(*leaves, *data[4:], width, height, background)
        mid = time.perf_counter()
        ((image * weights[0]).sum() + (alpha * weights[1]).sum()).backward()
        end = time.perf_counter()
        forward.append(mid - start)
        backward.append(end - mid)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "forward_ms": 1e3 * statistics.median(forward[1:]),
        "backward_ms": 1e3 * statistics.median(backward[1:]),
        "peak_rss_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=SIZES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch-max-pairs", type=float, default=3e7)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # kind:n:width:height, in a child
    args = parser.parse_args()
    if args.case:
        kind, *dims = args.case.split(":")
        print(json.dumps(run_case(kind, *map(int, dims), args.repeat)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| Gaussians | image | pairs | rasterizer | forward ms | backward ms | peak RSS MiB |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for size in args.sizes.split(","):
        n, width, height = map(int, size.split("x"))
        data = scene(n, width, height)
        pairs = box_pairs(data[0], data[5], width, height)
        for kind in ("native", "torch"):
            row = f"| {n:,} | {width}x{height} | {pairs / 1e6:.1f}M | {kind} |"
            if kind == "torch" and pairs > args.torch_max_pairs:
                print(f"{row} skipped (pairs > {args.torch_max_pairs:.0e}) | | |")
                continue
            case = f"{kind}:{n}:{width}:{height}"
            done = subprocess.run(
                [sys.executable, __file__, "--case", case, "--repeat", str(args.repeat)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(f"{row} failed: {done.stderr.strip().splitlines()[-1]} | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{row} {r['forward_ms']:.0f} | {r['backward_ms']:.0f} | {r['peak_rss_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
