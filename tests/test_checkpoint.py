"""Checkpoints and exports at scale: streamed block by block from an engine with bounded extra
memory (two million rows, in a fresh process), exact when read back, the last K kept, a damaged
newest one skipped, a full disk named."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData

from clm.data.types import Similarity
from clm.engine.base import RowChunk, RowSource
from clm.errors import ClmError
from clm.methods.gaussians import GaussianSplatting
from clm.model.spec import gaussian_splatting_spec
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.render.splats import render_torch
from clm.train.checkpoint import (
    Checkpoint,
    list_checkpoints,
    open_checkpoint,
    save_checkpoint,
    state_blocks,
    state_columns,
)
from clm.train.checkpoint_source import checkpoint_source
from clm.train.engine_factory import EngineOptions, make_engine

SPEC = gaussian_splatting_spec(3)
ROWS = 1 << 19
CHUNK = 1 << 16
USED_BANDS = 3  # SH degree 1: higher bands hold zeros, as before degree 2 is ever active


def random_chunks(n: int, seed: int, chunk: int = CHUNK):
    """Chunks of a trained-looking model, made on demand (never all at once)."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        parts = []
        for kind in range(3):
            values = {}
            for a in SPEC:
                t = torch.randn(m, *a.shape, generator=gen)
                if kind:
                    t = t.abs() if kind == 2 else t
                if a.name == "shN":
                    t[:, USED_BANDS:] = 0
                values[a.name] = t
            parts.append(values)
        yield RowChunk(*parts)


def make(source: RowSource, **overrides):
    return make_engine(
        EngineOptions(offload="clm", **overrides),
        SPEC,
        source,
        render_torch,
        LearningRates(SPEC, 100),
        AdamConfig(),
        torch.device("cpu"),
        64 * 64,
    )


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> PeakRss:
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def model_bytes(n: int) -> int:
    """Parameters and both moments, float32."""
    return n * 3 * 4 * sum(a.width for a in SPEC)


@pytest.fixture(scope="module")
def engine():
    engine = make(RowSource(ROWS, random_chunks(ROWS, seed=1), step=7))
    yield engine
    engine.close()


def assert_same_state(a, b) -> None:
    for mine, theirs in zip(a.state_chunks(CHUNK), b.state_chunks(CHUNK), strict=True):
        pairs = zip((mine.params, *mine.moments()), (theirs.params, *theirs.moments()), strict=True)
        for x, y in pairs:
            for name in x:
                assert torch.equal(x[name], y[name]), name


# What the trainer records of its optimiser, for rows saved as they were (lazy rows).
OPTIMIZER = {
    "total_steps": 100,
    "extent": 1.0,
    "batch_size": 1,
    "betas": [0.9, 0.999],
    "eps": 1e-15,
}


def save_lazy(folder: Path, engine, step: int, **kw):
    """A checkpoint as the trainer writes it: lazy rows as they are, with their steps."""
    blocks = state_blocks(engine.state_chunks(CHUNK, lazy=True))
    columns = state_columns(SPEC, lazy=True)
    return save_checkpoint(folder, step, {"optimizer": OPTIMIZER}, columns, blocks, **kw)


def test_checkpoint_streams_back_exactly(engine, tmp_path):
    assert engine.num_gaussians == ROWS and engine.step == 7
    saved = save_lazy(tmp_path, engine, 7, keep=2)
    # The all-zero SH bands are not written: a third of the full size plus the rest.
    assert saved.bytes < 0.45 * model_bytes(ROWS)
    ckpt = Checkpoint(saved.path)
    assert (ckpt.step, ckpt.count) == (7, ROWS)
    for lazy in (True, False):  # rows as they were, or caught up on the way
        loaded = make(checkpoint_source(ckpt, SPEC, lazy=lazy))
        try:
            assert loaded.step == 7
            assert_same_state(engine, loaded)
        finally:
            loaded.close()


def measure_streaming(folder: Path, rows: int) -> dict[str, int]:
    """Extra peak RSS of saving, loading (beyond the loaded model itself) and exporting a model
    of ``rows`` rows; run in a fresh process, so earlier tests' heap does not blur it."""
    engine = make(RowSource(rows, random_chunks(rows, seed=2), step=3))
    with PeakRss() as saving:
        saved = save_lazy(folder, engine, 3)
    with PeakRss() as exporting:
        params = (c.params for c in engine.state_chunks(CHUNK))
        GaussianSplatting().export_ply(
            folder / "m.ply", SPEC, params, rows, Similarity(1.0, np.zeros(3))
        )
    engine.close()
    del engine
    with PeakRss() as loading:
        loaded = make(checkpoint_source(Checkpoint(saved.path), SPEC, lazy=True))
    held = loaded.host.store.allocated_bytes + loaded.key.table["param"].numel() * 12
    return {
        "save": saving.extra,
        "export": exporting.extra,
        "load": loading.extra - held,
        "model": model_bytes(rows),
    }


def test_streaming_extra_memory_is_bounded_at_two_million_rows(tmp_path):
    run = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(1 << 21)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for what in ("save", "export", "load"):
        assert got[what] < 0.15 * got["model"], got


def test_ply_export_reads_back(engine, tmp_path):
    to_train = Similarity(2.0, np.array([1.0, -2.0, 0.5]))
    path = tmp_path / "model.ply"
    written, dropped = GaussianSplatting().export_ply(
        path, SPEC, (c.params for c in engine.state_chunks(CHUNK)), ROWS, to_train
    )
    assert (written, dropped) == (ROWS, 0)
    vertex = PlyData.read(str(path))["vertex"]  # plyfile: an independent reader
    assert vertex.count == ROWS
    rows = [0, ROWS // 2 + 3, ROWS - 1]
    chunks = {r // CHUNK: None for r in rows}
    for i, chunk in enumerate(engine.state_chunks(CHUNK)):
        if i in chunks:  # (a chunk may be reused by the next one: keep a copy)
            chunks[i] = {k: v.clone() for k, v in chunk.params.items()}
    for r in rows:
        p = {k: v[r % CHUNK] for k, v in chunks[r // CHUNK].items()}
        world = p["means"].double() / 2.0 + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        assert np.allclose([vertex["x"][r], vertex["y"][r], vertex["z"][r]], world, atol=1e-5)
        assert np.isclose(vertex["scale_1"][r], p["scales"][1] - np.log(2.0), atol=1e-5)
        # f_rest_{c*15 + k} holds band k of colour channel c.
        assert np.isclose(vertex["f_rest_16"][r], p["shN"][1, 1])
        assert np.isclose(vertex["f_rest_2"][r], p["shN"][2, 0])
        assert vertex["f_rest_44"][r] == 0.0


def small_checkpoint(output: Path, step: int, keep: int = 2):
    blocks = state_blocks(random_chunks(1000, seed=step, chunk=300))
    columns = state_columns(SPEC)
    return save_checkpoint(output, step, {"note": step}, columns, blocks, keep=keep, rows=1000)


def test_the_last_k_checkpoints_are_kept(tmp_path):
    for step in (10, 20, 30, 40):
        small_checkpoint(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_0000030.ckpt",
        "step_0000040.ckpt",
    ]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    blocks = list(Checkpoint(list_checkpoints(tmp_path)[-1]).blocks(["param/shN"]))
    assert [len(b["param/shN"]) for b in blocks] == [300, 300, 300, 100]
    assert blocks[0]["param/shN"].shape[1:] == (15, 3)  # trimmed bands come back as zeros


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    small_checkpoint(tmp_path, 10)
    newest = small_checkpoint(tmp_path, 20).path
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(ClmError, match="not a readable clm checkpoint"):
        Checkpoint(newest)
    with caplog.at_level("WARNING"):
        ckpt = open_checkpoint(tmp_path)
    assert ckpt.step == 10 and ckpt.meta["note"] == 10
    assert "falling back" in caplog.text


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    small_checkpoint(tmp_path, 10)
    real_fdopen = os.fdopen

    class FillingDisk:
        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            if self.stream.tell() > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.stream.write(data)

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    monkeypatch.setattr("clm.files.os.fdopen", lambda *a: FillingDisk(real_fdopen(*a)))
    # 1000 rows of 59 floats, three times (parameters and both moments): 708 kB
    needed = r"no space left on .*checkpoints \(up to 0\.71 MB needed; .*previous file is intact"
    with pytest.raises(ClmError, match=needed):
        small_checkpoint(tmp_path, 20)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000010.ckpt"]
    assert Checkpoint(list_checkpoints(tmp_path)[0]).step == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000010.ckpt"]


def test_a_model_past_the_host_budget_is_refused_before_loading():
    started = []

    def chunks():
        started.append(True)
        yield from random_chunks(100, seed=0)

    with pytest.raises(ClmError, match=r"--max-host-gb .* holds at most"):
        make(RowSource(50_000_000, chunks()), max_host_gb=4.0)
    assert not started


if __name__ == "__main__":  # measure_streaming in a fresh process (see the test above)
    print(json.dumps(measure_streaming(Path(sys.argv[1]), int(sys.argv[2]))))
