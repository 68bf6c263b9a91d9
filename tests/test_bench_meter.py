"""tools/bench.py's step meter: what its images/s are made of."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from clm.engine.base import StepStats

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    spec = importlib.util.spec_from_file_location("tool_bench_meter", TOOLS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


class StepsOfTwoSeconds:
    """An engine whose every step takes two seconds of a fake clock."""

    def __init__(self, clock: list[float]) -> None:
        self.clock, self.step = clock, 0

    def train_step(self, views, *rest) -> None:
        self.clock[0] += 2.0
        self.step += 1
        self.last_stats = StepStats(visible_rows=10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA clock is the GPU's timeline")
def test_meter_times_the_steps_after_the_warmup_and_not_what_follows_the_last(bench, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    engine = StepsOfTwoSeconds(clock)
    meter = bench.StepMeter(engine, warmup=1)
    for _ in range(4):
        engine.train_step([None] * 4)
    clock[0] += 50.0  # a trainer's evaluation and export after its last step
    meter.stop()
    assert (meter.steps, meter.images, meter.visible) == (3, 12, 30)
    assert meter.elapsed == pytest.approx(6.0)
