"""Benchmarks on the GPU machine; each prints a Markdown table for the README.

  python tools/bench.py train   --scene S [--offload none] [--max-seconds 420] [--batch-size 1]
      one full training run (densification on): steps/s, peak GPU memory, held-out PSNR/SSIM.
  python tools/bench.py compare --scene S --steps 300 --batch-size 8 [--modes none,naive,clm]
      the three offload modes on the same scene and steps, side by side in one process.
  python tools/bench.py largest --scene S --counts 50e6,100e6 --max-gpu-gb 24 --steps 12
      [--offload clm]
      the largest Gaussian count (initialised on the scene's surfaces) that trains under the
      GPU budget, with its throughput; without --max-gpu-gb (nothing reserved ahead), the peak
      GPU memory per Gaussian of a mode at the given counts. --max-view-share 0.05 keeps only
      the views that each see at most 5% of the Gaussians (the street-level views of a city).

A scene folder is made with ``clm-synth`` (``--size medium`` or ``city``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clm.engine.base import AdamSettings, Engine
from clm.engine.factory import make_engine
from clm.errors import ClmError
from clm.model.spec import gaussian_splatting_spec
from clm.render.splats import default_renderer
from clm.synthetic.geometry import load_geometry
from clm.synthetic.surface import surface_params
from clm.train.config import make_config
from clm.train.loss import photometric_loss
from clm.train.schedule import LearningRates, adam_betas
from clm.train.trainer import Trainer, format_count

GIB = 2**30


def table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    when = time.strftime("%Y-%m-%d")
    return f"{when}, {gpu}, torch {torch.__version__}; command: {' '.join(sys.argv)}"


def reset_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class StepMeter:
    """Wraps an engine's ``train_step`` to sum its per-step figures after a warm-up."""

    def __init__(self, engine: Engine, warmup: int) -> None:
        self.engine, self.warmup = engine, warmup
        self.steps = self.images = self.up = self.down = self.hits = self.lookups = 0
        self.visible = 0
        self.start: float | None = None
        self.elapsed = 0.0
        inner = engine.train_step

        def timed(views, *rest, **kw):
            if self.engine.step == self.warmup:
                synchronize()
                self.start = time.perf_counter()
            inner(views, *rest, **kw)
            if self.engine.step > self.warmup:
                s = self.engine.last_stats
                self.steps += 1
                self.images += len(views)
                self.up += s.bytes_to_gpu
                self.down += s.bytes_to_host
                self.hits += s.cache_hits
                self.lookups += s.cache_lookups
                self.visible += s.visible_rows

        engine.train_step = timed  # type: ignore[method-assign]

    def stop(self) -> None:
        synchronize()
        if self.start is not None:
            self.elapsed = time.perf_counter() - self.start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- train --------------------------------------------------------------------------------------


def bench_train(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        given = {
            "scene": args.scene,
            "output": Path(tmp) / "run",
            "offload": args.offload,
            "batch_size": args.batch_size,
            "max_seconds": args.max_seconds,
            "steps": args.steps,
            "progress": False,
            "checkpoint_every": 10**9,
            "log_every": 100,
        }
        if args.max_gpu_gb:
            given["max_gpu_gb"] = args.max_gpu_gb
        trainer = Trainer(make_config(given))
        reset_gpu()
        meter = StepMeter(trainer.engine, warmup=10)
        t0 = time.perf_counter()
        try:
            metrics = trainer.run()
        finally:
            meter.stop()
            trainer.close()
        wall = time.perf_counter() - t0
        frame = trainer.scene.train[0]
        peak = torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else 0.0
        print(header(args))
        print(
            table(
                [
                    {
                        "scene": f"{Path(args.scene).name} ({len(trainer.scene.train)} train imgs, "
                        f"{frame.width}x{frame.height})",
                        "offload": args.offload,
                        "steps": metrics["step"],
                        "steps/s": f"{meter.steps / max(meter.elapsed, 1e-9):.2f}",
                        "train s": f"{metrics['train_seconds']:.0f}",
                        "Gaussians": format_count(metrics["num_gaussians"]),
                        "peak GPU reserved": f"{peak:.2f} GiB",
                        "PSNR": f"{metrics['psnr']:.2f}",
                        "SSIM": f"{metrics['ssim']:.4f}",
                        "wall s": f"{wall:.0f}",
                    }
                ]
            )
        )


# ---- compare ------------------------------------------------------------------------------------


def run_mode(args: argparse.Namespace, mode: str, tmp: Path) -> dict[str, object]:
    given = {
        "scene": args.scene,
        "output": tmp / mode,
        "offload": mode,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "progress": False,
        "checkpoint_every": 10**9,
        "log_every": 50,
        "seed": 0,
    }
    if args.max_gpu_gb:
        given["max_gpu_gb"] = args.max_gpu_gb
    reset_gpu()
    trainer = Trainer(make_config(given))
    meter = StepMeter(trainer.engine, warmup=args.warmup)
    try:
        # run() evaluates and exports after the last step; time only the steps.
        metrics = trainer.run()
    finally:
        meter.stop()
        engine = trainer.engine
        host_bytes = engine.host.store.allocated_bytes if hasattr(engine, "host") else 0
        busy = getattr(getattr(engine, "worker", None), "busy_seconds", 0.0)
        busy += getattr(getattr(engine, "prefetch", None), "busy_seconds", 0.0)
        exposed = getattr(engine, "exposed_seconds", 0.0)
        trainer.close()
    peak = torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else 0.0
    imgs = max(meter.images, 1)
    row: dict[str, object] = {
        "mode": mode,
        "steps/s": f"{meter.steps / max(meter.elapsed, 1e-9):.2f}",
        "images/s": f"{meter.images / max(meter.elapsed, 1e-9):.1f}",
        "Gaussians": format_count(metrics["num_gaussians"]),
        "peak GPU reserved": f"{peak:.2f} GiB",
        "host (pinned)": f"{host_bytes / GIB:.2f} GiB",
        "MB/img to GPU": f"{meter.up / imgs / 1e6:.1f}",
        "MB/img to host": f"{meter.down / imgs / 1e6:.1f}",
        "cache hits": f"{meter.hits / meter.lookups:.1%}" if meter.lookups else "-",
        "CPU Adam busy / exposed s": f"{busy:.1f} / {exposed:.1f}" if busy else "-",
        "PSNR": f"{metrics['psnr']:.2f}",
    }
    return row


def bench_compare(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            rows.append(run_mode(args, mode, Path(tmp)))
            print(rows[-1], flush=True)
    print(header(args))
    print(table(rows))


# ---- largest ------------------------------------------------------------------------------------


def pick_views(params, views: list, max_share: float | None) -> tuple[list[int], list]:
    """The views (and their frame indices) that each see at most ``max_share`` of ``params``
    (all of them when None): street-level views of a synthetic city, say."""
    if max_share is None:
        return list(range(len(views))), views
    from clm.offload.culling import Culler

    device = views[0].viewmat.device
    args = [params[n].to(device) for n in ("means", "scales", "opacities")]
    counts = Culler(device).visible_counts(*args, views)
    n = args[0].shape[0]
    frames = [i for i, c in enumerate(counts) if c <= max_share * n]
    return frames, [views[i] for i in frames]


def bench_largest(args: argparse.Namespace) -> None:
    from clm.data.images import ImageCache
    from clm.data.scene import load_scene
    from clm.train.views import frame_to_view

    device = torch.device(args.device)
    scene = load_scene(Path(args.scene), 1, 8)
    spec = gaussian_splatting_spec(3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = ImageCache(scene.train, Path(tmp) / "cache", scene.background)
        all_views = [frame_to_view(f, device) for f in scene.train]
        for count in (int(float(c)) for c in args.counts.split(",")):
            reset_gpu()
            cfg = make_config(
                {
                    "scene": args.scene,
                    "offload": args.offload,
                    "max_gpu_gb": args.max_gpu_gb,
                    "batch_size": args.batch_size,
                    "progress": False,
                    "device": args.device,
                }
            )
            chunks = surface_params(
                load_geometry(args.scene),
                count,
                chunk=4_000_000,
                num_rest=15,
                to_train=scene.to_train,
                device=device,
            )
            engine = meter = None
            lrs = LearningRates(spec, 1000, scene.extent, args.batch_size)
            try:
                adam = AdamSettings(betas=adam_betas(args.batch_size))
                pixels = max(f.width * f.height for f in scene.train)
                first = next(chunks)
                frames, views = pick_views(first, all_views, args.max_view_share)
                engine = make_engine(
                    cfg, spec, first, default_renderer(device), lrs, adam, device, pixels, views
                )
                if engine.max_gaussians is not None and count > engine.max_gaussians:
                    raise ClmError(f"the plan allows {engine.max_gaussians} Gaussians")
                for params in chunks:
                    engine.extend(params)
                meter = StepMeter(engine, warmup=2)
                rng = np.random.default_rng(0)
                bg = torch.tensor(scene.background, device=device)
                for _ in range(args.steps):
                    batch = rng.choice(len(views), args.batch_size, replace=False).tolist()
                    targets = [
                        torch.from_numpy(np.array(images.get(frames[i]))).to(device).float() / 255
                        for i in batch
                    ]

                    def loss_fn(i, out, targets=targets):
                        return photometric_loss(out.image, targets[i]) / len(targets)

                    engine.train_step([views[i] for i in batch], loss_fn, lambda *a: None, 3, bg)
                meter.stop()
                peak = torch.cuda.max_memory_reserved() if device.type == "cuda" else 0
                host = engine.host.store.allocated_bytes / GIB if hasattr(engine, "host") else 0
                plan = engine.max_gaussians
                result = {
                    "offload": args.offload,
                    "views": len(views),
                    "Gaussians": format_count(count),
                    "planned max": f"{plan / 1e6:.0f}M" if plan else "-",
                    "steps/s": f"{meter.steps / max(meter.elapsed, 1e-9):.2f}",
                    "images/s": f"{meter.images / max(meter.elapsed, 1e-9):.1f}",
                    "visible rows/step": f"{meter.visible / max(meter.steps, 1) / 1e6:.1f}M",
                    "peak GPU reserved": f"{peak / GIB:.2f} GiB",
                    "GPU B/Gaussian": f"{peak / count:.0f}",
                    "host pinned": f"{host:.1f} GiB",
                    "status": "trains",
                }
                engine.close()
                engine = meter = None  # free the pinned rows before the next count
            except (ClmError, ValueError, torch.cuda.OutOfMemoryError) as exc:
                result = {
                    "offload": args.offload,
                    "views": "-",
                    "Gaussians": format_count(count),
                    "planned max": "-",
                    "steps/s": "-",
                    "images/s": "-",
                    "visible rows/step": "-",
                    "peak GPU reserved": "-",
                    "GPU B/Gaussian": "-",
                    "host pinned": "-",
                    "status": f"refused: {str(exc).splitlines()[0][:90]}",
                }
                if engine is not None:
                    engine.close()
                engine = meter = None
            rows.append(result)
            print(result, flush=True)
        images.close()
    print(header(args))
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--offload", default="none")
    p.add_argument("--max-seconds", type=float, default=420)
    p.add_argument("--steps", type=int, default=30000)
    p2 = sub.add_parser("compare")
    p2.add_argument("--modes", default="none,naive,clm")
    p2.add_argument("--steps", type=int, default=300)
    p2.add_argument("--warmup", type=int, default=20)
    p3 = sub.add_parser("largest")
    p3.add_argument("--counts", default="50e6,100e6")
    p3.add_argument("--steps", type=int, default=12)
    p3.add_argument("--device", default="cuda")
    p3.add_argument("--offload", default="clm")
    p3.add_argument(
        "--max-view-share",
        type=float,
        default=None,
        help="train only on views that each see at most this fraction of the Gaussians",
    )
    for q in (p, p2, p3):
        q.add_argument("--scene", required=True)
        q.add_argument("--batch-size", type=int, default=1)
        q.add_argument("--max-gpu-gb", type=float, default=None)
    args = parser.parse_args()
    {"train": bench_train, "compare": bench_compare, "largest": bench_largest}[args.command](args)


if __name__ == "__main__":
    main()
