"""Throughput of the CPU lazy Adam: native kernel vs the torch fallback, in million rows/s.

A host store of ``--rows`` rows of ``--width`` floats (chunks of 2^16 rows, SH-like segments
of 3 and 45 columns) receives sparse updates of ``--batch`` distinct random rows, either in
random order or sorted. "+skip": the rows were last updated 50 steps earlier, so their skipped
steps are caught up first; otherwise they were updated at the previous step. "catch_up(all)"
catches up every row of the store, as before a checkpoint. Best of ``--repeat`` runs.

    python tools/bench_cpu_adam.py [--rows 8000000] [--batch 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import torch

from clm.optim.cpu_adam import CpuRowAdam
from clm.optim.lazy_adam import AdamConfig, Segment, SkipTable

CHUNK_SHIFT = 16
SKIP = 50
COLUMNS = ("random+skip", "random", "sorted+skip", "sorted", "catch_up(all)")


def _store(n_rows: int, width: int) -> SimpleNamespace:
    r = 1 << CHUNK_SHIFT
    n_chunks = -(-n_rows // r)
    return SimpleNamespace(
        param_chunks=[torch.randn(r, width) for _ in range(n_chunks)],
        exp_avg_chunks=[torch.randn(r, width) * 1e-3 for _ in range(n_chunks)],
        exp_avg_sq_chunks=[torch.rand(r, width) * 1e-6 for _ in range(n_chunks)],
        last_chunks=[torch.zeros(r, dtype=torch.int32) for _ in range(n_chunks)],
    )


class _Run:
    """Drives the step counter and the skip tables as a trainer would (lr decaying per step)."""

    def __init__(self, store: SimpleNamespace, config: AdamConfig, width: int) -> None:
        self.store, self.width = store, width
        self.tables = [SkipTable(config), SkipTable(config)]
        self.step = 0
        for _ in range(2 * SKIP):
            self._advance()

    def segments(self, step: int) -> list[Segment]:
        decay = 0.99**step
        a, b = self.tables
        return [Segment(0, 3, 2.5e-3 * decay, a), Segment(3, self.width, 1.25e-4 * decay, b)]

    def _advance(self) -> None:
        self.step += 1
        for tab, seg in zip(self.tables, self.segments(self.step), strict=True):
            tab.advance(self.step, seg.lr)

    def time_step(self, adam: CpuRowAdam, rows: torch.Tensor, grads: torch.Tensor) -> float:
        """Seconds for one optimiser step over ``rows``."""
        start = time.perf_counter()
        adam.step_rows(rows, grads, self.width, self.step + 1, self.segments(self.step + 1))
        elapsed = time.perf_counter() - start
        self._advance()
        return elapsed

    def time_catch_up_all(self, adam: CpuRowAdam) -> float:
        start = time.perf_counter()
        adam.catch_up(None, self.step, self.segments(self.step))
        return time.perf_counter() - start

    def age_all_rows(self) -> None:
        for last in self.store.last_chunks:
            last.fill_(self.step - SKIP)


def _measure(run: _Run, adam: CpuRowAdam, batch: int, grads: torch.Tensor) -> list[float]:
    """Rows per second for each of COLUMNS, one run each."""
    capacity = len(run.store.param_chunks) << CHUNK_SHIFT
    rates = []
    for order in ("random", "sorted"):
        rows = torch.randperm(capacity)[:batch]
        if order == "sorted":
            rows = rows.sort().values
        run.age_all_rows()
        rates.append(batch / run.time_step(adam, rows, grads))
        rates.append(batch / run.time_step(adam, rows, grads))
    run.age_all_rows()
    rates.append(capacity / run.time_catch_up_all(adam))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8_000_000)
    parser.add_argument("--batch", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    config = AdamConfig(betas=(0.9, 0.999), eps=1e-15)
    run = _Run(_store(args.rows, args.width), config, args.width)
    grads = torch.randn(args.batch, args.width) * 1e-4

    print(f"{args.batch:,} of {args.rows:,} rows x {args.width} float32, {cores} cores, M rows/s")
    print(f"{'impl':<8}{'threads':>8}" + "".join(f"{c:>15}" for c in COLUMNS))
    for name, threads in (("native", 1), ("native", cores), ("torch", 1), ("torch", cores)):
        torch.set_num_threads(threads)
        adam = CpuRowAdam(run.store, config, threads=threads, use_native=name == "native")
        if name == "native" and not adam.native:
            print("native kernel unavailable")
            continue
        runs = [_measure(run, adam, args.batch, grads) for _ in range(args.repeat)]
        best = [max(col) / 1e6 for col in zip(*runs, strict=True)]
        print(f"{name:<8}{threads:>8}" + "".join(f"{b:>15.2f}" for b in best))
    torch.set_num_threads(cores)


if __name__ == "__main__":
    main()
