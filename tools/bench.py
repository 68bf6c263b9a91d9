"""Benchmarks on the GPU machine; each prints a Markdown table for the README.

  python tools/bench.py train   --scene S [--offload none] [--max-seconds 420] [--batch-size 1]
      one full training run (densification on): steps/s, peak GPU memory, held-out PSNR/SSIM.
  python tools/bench.py compare --scene S --steps 300 --batch-size 8 [--modes none,naive,clm]
      the three offload modes on the same scene and steps, side by side in one process, with
      every image decoded beforehand (200 steps of batch 4 is the peer's protocol, 800 images).
  python tools/bench.py largest --scene S --counts 10e6,40e6 --modes none,clm@24 --steps 12
      Gaussians initialised on the scene's surfaces, trained by each mode in turn with the
      same seed and batches (``MODE@GB``: under ``--max-gpu-gb GB``, else uncapped), every
      image decoded beforehand and each batch's images staged as the trainer stages them: whether
      the count fits, throughput, peak GPU memory, the host traffic per step and its share of
      the host's memory bandwidth, rows resident and rows without gradient, and the PSNR of
      the trained views. --max-view-share 0.05 keeps only the views that each see at most 5%
      of the Gaussians (the street-level views of a city).

A scene folder is made with ``clm-synth`` (``--size medium`` or ``city``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clm.engine.base import Engine
from clm.errors import ClmError
from clm.methods.gaussians import GaussianSplatting
from clm.offload.step_memory import MEASURED_STEPS
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates, adam_betas
from clm.render.splats import default_renderer
from clm.synthetic.geometry import load_geometry
from clm.synthetic.surface import surface_params
from clm.train.batch_loss import batch_loss
from clm.train.config import make_config
from clm.train.engine_factory import EngineOptions, make_engine
from clm.train.log import format_count
from clm.train.targets import TargetStager
from clm.train.trainer import Trainer

GIB = 2**30
# Host memory bandwidth of the GPU machine (torch copy, 16 threads; DESIGN.md), bytes/s.
HOST_BANDWIDTH = 59e9


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
        torch.cuda.set_per_process_memory_fraction(1.0)  # a cap a previous run set goes
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class StepMeter:
    """Wraps an engine's ``train_step`` to sum its per-step figures after a warm-up.

    The clock runs from the warm-up's end to the end of the last step's GPU work, whenever
    :meth:`stop` is called: what a trainer does after its last step (the final evaluation, the
    export) is not a step's."""

    def __init__(self, engine: Engine, warmup: int) -> None:
        self.engine, self.warmup = engine, warmup
        self.first: float | None = None  # when the first step started
        self.steps = self.images = self.up = self.down = self.hits = self.lookups = 0
        self.visible = self.host_rows = self.read_rows = 0
        self.start: float | None = None
        self._marks: list[torch.cuda.Event | float] = []  # the warm-up's end, the last step's
        self.elapsed = 0.0
        # host rows stepped by the CPU Adam, gradient rows that crossed to the host (on CUDA,
        # rows without gradient stay on the GPU), rows whose skipped steps were caught up in
        # host memory, and values gathered with skipped steps pending (caught up on the GPU)
        self.stepped = self.sent = self.caught_up = self.gathered_stale = 0
        inner = engine.train_step

        def timed(views, *rest, **kw):
            if self.first is None:
                synchronize()
                self.first = time.perf_counter()
            if self.engine.step == self.warmup:
                synchronize()
                self.start = time.perf_counter()
                self._marks = [step_mark()]
                self._counted = self._flush_counts()
            inner(views, *rest, **kw)
            if self.engine.step > self.warmup:
                self._marks[1:] = [step_mark()]
                s = self.engine.last_stats
                self.steps += 1
                self.images += len(views)
                self.up += s.bytes_to_gpu
                self.down += s.bytes_to_host
                self.hits += s.cache_hits
                self.lookups += s.cache_lookups
                self.visible += s.visible_rows
                self.host_rows += s.host_rows
                self.read_rows += s.read_rows

        engine.train_step = timed  # type: ignore[method-assign]

    def _flush_counts(self) -> tuple[int, int, int, int]:
        flusher = getattr(self.engine, "flusher", None)
        if flusher is None:
            return 0, 0, 0, 0
        self.engine._drain()  # the CPU Adam
        host, gather = self.engine.host, self.engine.gather
        return flusher.rows_stepped, flusher.rows_sent, host.rows_caught_up, gather.values_caught_up

    def stop(self) -> None:
        synchronize()
        if self.start is not None:
            if len(self._marks) == 2:
                self.elapsed = seconds_between(*self._marks)
            else:  # stopped before a step was timed
                self.elapsed = time.perf_counter() - self.start
            counts = [b - a for a, b in zip(self._counted, self._flush_counts(), strict=True)]
            self.stepped, self.sent, self.caught_up, self.gathered_stale = counts

    def host_bytes(self, row_bytes: int) -> float:
        """Host memory traffic per step: every byte over PCIe crosses host memory once, the
        CPU Adam reads a gradient row and reads and writes a stepped row's parameters and
        moments, a catch-up in host memory reads and writes a row's parameters and moments, and
        a gather that catches a row up reads its moments too (all columns: the benchmark trains
        at its full SH degree)."""
        if not self.steps:
            return 0.0
        has_flusher = getattr(self.engine, "flusher", None) is not None
        down = self.sent * row_bytes if has_flusher else self.down
        adam = self.stepped * 7 * row_bytes + (self.sent - self.stepped) * row_bytes
        catch_up = self.caught_up * 6 * row_bytes + self.gathered_stale * 2 * 4
        return (self.up + down + adam + catch_up) / self.steps


def step_mark() -> torch.cuda.Event | float:
    """A point in the loop: on CUDA, where the GPU reaches what was queued so far (an event in
    the stream, read after the run, so timing adds no sync to the loop); else the host clock."""
    if not torch.cuda.is_available():
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(a: torch.cuda.Event | float, b: torch.cuda.Event | float) -> float:
    """Seconds from mark ``a`` to mark ``b`` (events: once both have passed)."""
    if isinstance(a, float) and isinstance(b, float):
        return b - a
    return a.elapsed_time(b) / 1e3


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
        "cache_dir": args.cache_dir,
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
        busy = 0.0
        if hasattr(engine, "flusher"):
            busy = engine.flusher.worker.busy_seconds
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


def decode_images(scene_dir: str, cache_dir: Path) -> None:
    """Decode every image of the scene into ``cache_dir`` with all cores, before any run is
    timed (the peer's protocol: images decoded first)."""
    from clm.data.images import ImageCache
    from clm.data.scene import load_scene

    scene = load_scene(Path(scene_dir), 1, 8)
    frames = scene.train + scene.test
    with ImageCache(frames, cache_dir, scene.background) as images:
        decode_all(images, len(frames))


def decode_all(images, count: int) -> None:
    """Decode frames ``0..count-1`` into the image cache with all cores."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor() as pool:
        list(pool.map(images.get, range(count)))


def bench_compare(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.cache_dir = Path(tmp) / "images"
        decode_images(args.scene, args.cache_dir)
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


@contextlib.contextmanager
def host_timers(engine: Engine, stager: TargetStager | None = None):
    """The engine's phases, and the stager's ``take``, timed on the host
    (tools/profile_step.py's labels), as a clock whose ``seconds`` sum each phase while
    ``active``."""
    from profile_step import CLOCK, phase_labels

    CLOCK.seconds, CLOCK.active = {}, False
    with phase_labels(engine, stager):
        yield CLOCK
    CLOCK.active = False


def parse_modes(text: str) -> list[tuple[str, float | None]]:
    """``none,clm@24`` -> [("none", None), ("clm", 24.0)]."""
    modes = []
    for item in text.split(","):
        mode, _, cap = item.partition("@")
        modes.append((mode, float(cap) if cap else None))
    return modes


@torch.no_grad()
def view_psnr(engine: Engine, views: list, targets: list, background: Tensor) -> float:
    """Mean PSNR of ``views`` against their images."""
    scores = []
    for view, target in zip(views, targets, strict=True):
        image = engine.render(view, 3, background).image.clamp(0, 1)
        mse = torch.mean((image - target) ** 2).item()
        scores.append(10 * np.log10(1 / max(mse, 1e-12)))
    return float(np.mean(scores))


def run_largest(args, scene, images, all_views, count, mode, cap) -> dict:
    """Train ``count`` surface Gaussians with ``mode`` under ``cap`` GiB (None: uncapped)."""
    device = torch.device(args.device)
    method = GaussianSplatting()
    spec = method.spec(3)
    label = mode if cap is None else f"{mode} @ {cap:g} GiB"
    reset_gpu()
    given = {"scene": args.scene, "offload": mode, "batch_size": args.batch_size}
    # no density control here: the model never grows past its count, which is what lets the
    # planner keep the rotations the walk reads on the GPU (see clm.train.engine_factory)
    given.update(progress=False, device=args.device, max_gaussians=int(count))
    if cap is not None:
        given["max_gpu_gb"] = cap
    cfg = make_config(given)
    chunks = surface_params(
        load_geometry(args.scene),
        count,
        chunk=4_000_000,
        num_rest=15,
        to_train=scene.to_train,
        device=device,
    )
    engine = None
    lrs = LearningRates(spec, 1000, scene.extent, args.batch_size)
    try:
        adam = AdamConfig(betas=adam_betas(args.batch_size))
        pixels = max(f.width * f.height for f in scene.train)
        first = next(chunks)
        frames, views = pick_views(first, all_views, args.max_view_share)
        engine = make_engine(
            EngineOptions.of(cfg),
            spec,
            first,
            default_renderer(device),
            lrs,
            adam,
            device,
            pixels,
            views,
        )
        if engine.max_gaussians is not None and count > engine.max_gaussians:
            raise ClmError(f"the plan allows {engine.max_gaussians} Gaussians")
        for params in chunks:
            engine.extend(params)
        # Timed once the engine has settled: clm sizes its resident rows from its first steps'
        # GPU memory and moves them to the GPU at the start of the step after (a one-time cost,
        # printed as part of the warm-up's time).
        meter = StepMeter(engine, warmup=MEASURED_STEPS + 1)
        rng = np.random.default_rng(0)
        bg = torch.tensor(scene.background, device=device)

        def target(i: int) -> Tensor:
            return torch.from_numpy(np.array(images.get(frames[i]))).to(device).float() / 255

        # the trainer's staging: the next batch's images are copied into pinned buffers on a
        # thread while this step runs, and uploaded asynchronously
        stager = TargetStager.for_frames(images, device, args.batch_size, scene.train)
        timers = host_timers(engine, stager) if args.host_timers else contextlib.nullcontext()
        with timers as clock, contextlib.closing(stager):
            batches = [
                [frames[i] for i in rng.choice(len(views), args.batch_size, replace=False)]
                for _ in range(args.steps)
            ]
            by_frame = dict(zip(frames, views, strict=True))
            for k, batch in enumerate(batches):
                if clock is not None:
                    clock.active = k >= meter.warmup
                if k + 1 < len(batches):
                    stager.prepare(batches[k + 1])
                targets = stager.take(batch)
                chosen = [by_frame[i] for i in batch]
                loss_fn = batch_loss(method, targets, chosen, (k + 1) * args.batch_size)
                engine.train_step(chosen, loss_fn, lambda *a: None, 3, bg)
            meter.stop()
        if meter.first is not None and meter.steps:
            print(f"{label}: {meter.warmup} warm-up steps took {meter.start - meter.first:.1f} s")
        if mode == "clm":
            on_gpu = ", ".join(a.name for a in engine.spec.key)
            print(f"{label}: on the GPU for every Gaussian: {on_gpu}")
        if clock is not None:
            done = max(meter.steps, 1)
            phases = sorted(clock.seconds.items(), key=lambda kv: -kv[1])
            print(f"host ms/step, {label}, {format_count(count)}, after {meter.warmup} steps:")
            print(table([{"phase": n, "ms/step": f"{t / done * 1e3:.1f}"} for n, t in phases]))
        peak = torch.cuda.max_memory_reserved() if device.type == "cuda" else 0
        scored = list(range(0, len(views), max(1, len(views) // 8)))[:8]
        psnr = view_psnr(engine, [views[i] for i in scored], [target(i) for i in scored], bg)
        resident = getattr(engine, "resident", None)
        row_bytes = 4 * sum(a.width for a in spec.host)
        host = meter.host_bytes(row_bytes)
        steps_per_s = meter.steps / max(meter.elapsed, 1e-9)
        result = {
            "mode": label,
            "views": len(views),
            "Gaussians": format_count(count),
            "images/s": f"{meter.images / max(meter.elapsed, 1e-9):.2f}",
            "visible rows/step": f"{meter.visible / max(meter.steps, 1) / 1e6:.2f}M",
            "resident": f"{resident.count / count:.0%}" if resident is not None else "all",
            "host rows/step": f"{meter.host_rows / max(meter.steps, 1) / 1e6:.2f}M"
            if resident is not None
            else "-",
            # culled-in host rows the renders read (rendered and stepped), summed over groups
            "read rows/step": f"{meter.read_rows / max(meter.steps, 1) / 1e6:.2f}M"
            if resident is not None
            else "-",
            # culled-in host rows whose batch gradient was zero, of all culled-in host rows
            "no-gradient rows": f"{1 - meter.stepped / meter.host_rows:.0%}"
            if resident is not None and meter.host_rows
            else "-",
            "host GB/step": f"{host / 1e9:.2f}",
            "host bandwidth": f"{host * steps_per_s / HOST_BANDWIDTH:.0%}",
            "peak GPU reserved": f"{peak / GIB:.2f} GiB",
            "PSNR (trained views)": f"{psnr:.2f}",
        }
        engine.close()
        return result
    except (ClmError, ValueError, torch.cuda.OutOfMemoryError) as exc:
        traceback.print_exc()
        if engine is not None:
            engine.close()
        return {"mode": label, "Gaussians": format_count(count), "refused": str(exc)[:120]}


def bench_largest(args: argparse.Namespace) -> None:
    from clm.data.images import ImageCache
    from clm.data.scene import load_scene
    from clm.train.views import frame_to_view

    device = torch.device(args.device)
    scene = load_scene(Path(args.scene), 1, 8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = ImageCache(scene.train, Path(tmp) / "cache", scene.background)
        decode_all(images, len(scene.train))  # every mode reads decoded images, as the trainer's
        all_views = [frame_to_view(f, device) for f in scene.train]
        for count in (int(float(c)) for c in args.counts.split(",")):
            for mode, cap in parse_modes(args.modes):
                rows.append(run_largest(args, scene, images, all_views, count, mode, cap))
                print(rows[-1], flush=True)
        images.close()
    print(header(args))
    for row in rows:  # refusals have fewer columns: print them apart
        if "refused" in row:
            print(f"- {row['mode']}, {row['Gaussians']}: {row['refused']}")
    ok = [row for row in rows if "refused" not in row]
    if ok:
        print(table(ok))


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
    p3.add_argument("--counts", default="10e6")
    p3.add_argument("--steps", type=int, default=12)
    p3.add_argument("--device", default="cuda")
    p3.add_argument("--modes", default="none,clm", help="MODE or MODE@GB, comma-separated")
    p3.add_argument("--host-timers", action="store_true", help="time the engine's phases")
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
