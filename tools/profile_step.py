"""Where a training step's time goes, per offload mode, on the GPU machine.

  python tools/profile_step.py --scene S --modes none,clm --steps 30 --warmup 20 --batch-size 4
      [--trace DIR]

Runs the trainer under ``torch.profiler`` for ``--steps`` steps after a warm-up (make it longer
than the first epoch, whose images are still being decoded), with the engine's
phases (culling, planning, waiting for CPU work, loads, rendering, backward, flushes, key Adam)
labelled from outside the engine. It prints, per phase, the host time it takes per step and the
time the compute stream sits idle while the host is inside it: the bubbles that separate an
offloaded step from a GPU-only one. ``--trace`` also writes Chrome traces (gzip) for a viewer;
``--host-timers`` times the phases on the host alone, free of the profiler's overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from bench import synchronize, table  # tools/ is this script's folder
from torch.profiler import ProfilerActivity, profile, record_function

import clm.engine.offloaded as offloaded
from clm.engine.base import LocalLoss
from clm.train.config import make_config
from clm.train.trainer import Trainer

PREFIX = "phase:"


class HostClock:
    """Host seconds per phase, summed while ``active`` (no profiler, so no profiler overhead)."""

    def __init__(self) -> None:
        self.active = False
        self.seconds: dict[str, float] = {}


CLOCK = HostClock()


def labelled(fn, name: str):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            with record_function(PREFIX + name):
                return fn(*args, **kwargs)
        finally:
            if CLOCK.active:
                CLOCK.seconds[name] = CLOCK.seconds.get(name, 0.0) + time.perf_counter() - t0

    return inner


class LabelledLocalLoss:
    """A :class:`LocalLoss` timed as the "loss" phase, still local: the engine takes the path
    it takes untimed (one pass over pieces)."""

    def __init__(self, loss: LocalLoss) -> None:
        self.reach = loss.reach
        self.crop = labelled(loss.crop, "loss")
        self._loss = labelled(loss, "loss")

    def __call__(self, i, out):
        return self._loss(i, out)


def labelled_loss(loss_fn):
    """``loss_fn`` timed as the "loss" phase, keeping what the engine reads from it."""
    if isinstance(loss_fn, LocalLoss):
        return LabelledLocalLoss(loss_fn)
    return labelled(loss_fn, "loss")


@contextlib.contextmanager
def phase_labels(engine, stager=None) -> Iterator[None]:
    """Wrap the engine's phases in profiler ranges and host timers; the engine's code is left
    unchanged. Phases named after the pipeline's modules (cull, plan, catch-up, gather, flush,
    resident rows), the pieces path's, and the rest of a step; with ``stager`` (a
    :class:`clm.train.targets.TargetStager`), the main thread's time taking each batch's
    images, outside the engine's step (a stager that does not read ahead shows here)."""
    patched: list[tuple[object, str, object]] = []

    def wrap(owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        patched.append((owner, attr, original))
        setattr(owner, attr, labelled(original, name))

    wrap(engine, "render_fn", "render")
    if stager is not None:
        wrap(stager, "take", "take the batch's images")
    step = engine.train_step

    def train_step(views, loss_fn, observe, *rest):
        loss_fn, observe = labelled_loss(loss_fn), labelled(observe, "observe")
        return labelled(step, "step")(views, loss_fn, observe, *rest)

    engine.train_step = train_step
    if isinstance(engine, offloaded.OffloadEngine):
        for owner, attr, name in [
            (engine.culler, "cull", "cull"),
            (engine.resident, "split", "split by residency"),
            (engine, "_drain", "drain"),
            (engine, "_settle", "wait for the cpu adam"),
            (engine, "_read", "read: walk the views"),
            (engine, "_load", "load"),
            (engine.flusher, "flush", "flush"),
            (engine.flusher, "defer", "defer"),
            (engine.flusher, "flush_deferred", "flush deferred"),
            (engine.flusher.staging, "acquire", "wait for staging room"),
            # On the CPU Adam thread, alongside the main thread's phases:
            (engine.host, "step_rows", "cpu thread: adam"),
            (engine.flusher.deferred, "add", "cpu thread: sum deferred"),
            (engine.key, "step_sparse", "key adam"),
            (engine.resident, "step", "resident adam"),
            (engine.resident, "choose", "choose resident"),
            (engine.inputs, "gather", "gather inputs"),
            (engine, "_paint", "pieces: paint"),
            (engine, "_train_in_pieces", "pieces: all"),
        ]:
            wrap(owner, attr, name)
    plan_batch, backward = offloaded.plan_batch, torch.Tensor.backward
    offloaded.plan_batch = labelled(plan_batch, "plan")
    torch.Tensor.backward = labelled(backward, "backward")  # type: ignore[method-assign]
    try:
        yield
    finally:
        offloaded.plan_batch = plan_batch
        engine.train_step = step
        torch.Tensor.backward = backward  # type: ignore[method-assign]
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


def union_length(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def overlap(a: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of [lo, hi] covered by the sorted disjoint intervals ``a``."""
    total = 0.0
    for x, y in a:
        if y <= lo:
            continue
        if x >= hi:
            break
        total += min(y, hi) - max(x, lo)
    return total


def analyse(prof, steps: int, mode: str) -> list[dict[str, str]]:
    events = prof.events()
    kernels, phases, step_ranges = [], {}, []
    for e in events:
        start = e.time_range.start
        end = e.time_range.end
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((start, end))
        elif e.name.startswith(PREFIX):
            phases.setdefault(e.name[len(PREFIX) :], []).append((start, end))
        elif e.name == "ProfilerStep" or e.name.startswith("train_step"):
            step_ranges.append((start, end))
    busy = union_length(kernels)
    lo = min(s for s, _ in step_ranges)
    hi = max(e for _, e in step_ranges)
    wall = hi - lo
    gpu_busy = overlap(busy, lo, hi)
    rows = [
        {
            "mode": mode,
            "phase": "whole step",
            "host ms/step": f"{wall / steps / 1e3:.2f}",
            "GPU idle ms/step": f"{(wall - gpu_busy) / steps / 1e3:.2f}",
        }
    ]
    for name, ranges in sorted(phases.items()):
        ranges = union_length(ranges)  # nested calls count once
        host = sum(y - x for x, y in ranges)
        idle = sum((y - x) - overlap(busy, x, y) for x, y in ranges)
        rows.append(
            {
                "mode": mode,
                "phase": name,
                "host ms/step": f"{host / steps / 1e3:.2f}",
                "GPU idle ms/step": f"{idle / steps / 1e3:.2f}",
            }
        )
    return rows


def profile_mode(args: argparse.Namespace, mode: str, tmp: Path) -> list[dict[str, str]]:
    given = {
        "scene": args.scene,
        "output": tmp / mode,
        "offload": mode,
        "batch_size": args.batch_size,
        "steps": args.warmup + args.steps,
        "progress": False,
        "checkpoint_every": 10**9,
        "log_every": 10**9,
        "seed": 0,
        "cpu_threads": args.cpu_threads,
    }
    trainer = Trainer(make_config(given))
    engine = trainer.engine
    inner = engine.train_step
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    CLOCK.seconds = {}
    window = [0.0, 0.0]

    def step(*a, **kw):
        if engine.step == args.warmup:
            synchronize()
            window[0] = time.perf_counter()
            CLOCK.active = True
            if not args.host_timers:
                prof.start()
        with record_function("train_step"):
            inner(*a, **kw)
        if engine.step == args.warmup + args.steps:
            synchronize()
            window[1] = time.perf_counter()
            CLOCK.active = False
            if not args.host_timers:
                prof.stop()

    engine.train_step = step
    try:
        with phase_labels(engine, trainer.targets):
            trainer.run()
    finally:
        trainer.close()
    if args.host_timers:
        per_step = lambda s: f"{s / args.steps * 1e3:.2f}"  # noqa: E731
        rows = [
            {"mode": mode, "phase": "whole step", "host ms/step": per_step(window[1] - window[0])}
        ]
        rows += [
            {"mode": mode, "phase": name, "host ms/step": per_step(sec)}
            for name, sec in sorted(CLOCK.seconds.items())
        ]
        return rows
    if args.trace:
        path = Path(args.trace) / f"trace-{mode}.json"
        prof.export_chrome_trace(str(path))
        with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(f"--- {mode}: top host ops over {args.steps} steps ---\n{top}", flush=True)
    return analyse(prof, args.steps, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", required=True)
    parser.add_argument("--modes", default="none,clm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpu-threads", type=int, default=None, help="CPU Adam threads")
    parser.add_argument("--trace", default=None, help="folder for gzip Chrome traces")
    parser.add_argument(
        "--host-timers", action="store_true", help="time phases on the host, without a profiler"
    )
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            rows += profile_mode(args, mode, Path(tmp))
    print(table(rows))


if __name__ == "__main__":
    main()
