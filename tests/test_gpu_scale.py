"""GPU smoke run at a large count (``pytest -m gpu``): a streamed model of ten million Gaussians
trains under a hard GPU cap, checkpoints, reloads exactly and exports, block by block."""

import math

import pytest
import torch
from plyfile import PlyData
from test_gpu import ring_views

from clm.data.types import Similarity
from clm.engine.base import RowChunk, RowSource
from clm.methods.gaussians import GaussianSplatting
from clm.model.spec import gaussian_splatting_spec
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.render.splats import render_gsplat
from clm.train.checkpoint import Checkpoint, save_checkpoint, state_blocks, state_columns
from clm.train.checkpoint_source import checkpoint_source
from clm.train.engine_factory import EngineOptions, make_engine

pytestmark = pytest.mark.gpu
SPEC = gaussian_splatting_spec(3)
ROWS = 10_000_000
CHUNK = 1 << 20


def surface_chunks(n: int, seed: int):
    """A dense initial model on a ring of walls around the cameras, streamed in chunks."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        angle = torch.rand(m, generator=g) * 2 * math.pi
        height = (torch.rand(m, generator=g) - 0.5) * 1.5
        means = torch.stack([angle.cos() * 3, height, angle.sin() * 3], 1)
        yield RowChunk(
            {
                "means": means,
                "scales": torch.full((m, 3), math.log(0.004)),
                "quats": torch.tensor([1.0, 0, 0, 0]).repeat(m, 1),
                "opacities": torch.randn(m, generator=g),
                "sh0": torch.rand(m, 1, 3, generator=g) - 0.5,
                "shN": torch.zeros(m, 15, 3),
            }
        )


def make(source: RowSource, views):
    return make_engine(
        EngineOptions(offload="clm", max_gpu_gb=6.0, batch_size=2),
        SPEC,
        source,
        render_gsplat,
        LearningRates(SPEC, 100),
        AdamConfig(),
        torch.device("cuda"),
        max(v.width * v.height for v in views),
        views,
    )


def fingerprint(engine) -> list[float]:
    """Float64 sums of every column, chunk by chunk (the model is never copied whole)."""
    sums = []
    for chunk in engine.state_chunks(CHUNK):
        for values in (chunk.params, *chunk.moments()):
            sums += [float(t.double().sum()) for t in values.values()]
    return sums


def test_ten_million_gaussians_train_checkpoint_reload_and_export(tmp_path):
    views = ring_views(8, 640, 360, device="cuda")
    engine = make(RowSource(ROWS, surface_chunks(ROWS, seed=3)), views)
    assert engine.num_gaussians == ROWS
    target = torch.full((360, 640, 3), 0.5, device="cuda")
    background = torch.zeros(3, device="cuda")
    for step in range(3):
        batch = views[2 * step : 2 * step + 2]
        engine.train_step(
            batch,
            lambda i, out: (out.image - target).abs().mean() / 2,
            lambda ids, out, view: None,
            sh_degree=1,
            background=background,
        )
    assert engine.last_stats.visible_rows > 0
    assert torch.cuda.max_memory_reserved() <= 6 * 2**30

    saved = save_checkpoint(
        tmp_path, engine.step, {}, state_columns(SPEC), state_blocks(engine.state_chunks(CHUNK))
    )
    before = fingerprint(engine)
    written, dropped = GaussianSplatting().export_ply(
        tmp_path / "model.ply",
        SPEC,
        (c.params for c in engine.state_chunks(CHUNK)),
        ROWS,
        Similarity(1.0, torch.zeros(3).numpy()),
    )
    assert (written, dropped) == (ROWS, 0)
    assert PlyData.read(str(tmp_path / "model.ply"))["vertex"].count == ROWS
    engine.close()
    del engine
    torch.cuda.empty_cache()

    reloaded = make(checkpoint_source(Checkpoint(saved.path), SPEC), views)
    assert reloaded.step == 3
    assert fingerprint(reloaded) == before
    reloaded.close()
