"""Checkpoint and PLY throughput at scale: an offloaded engine of N Gaussians (streamed in, SH
bands above degree 0 zero, as after a dense initialisation) is saved, loaded back and exported,
each timed, with the peak host RSS of the process; prints a Markdown table.

    python tools/bench_checkpoint.py --rows 20e6 --folder /tmp/ckbench [--no-export]
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import time
from pathlib import Path

import torch

from clm.data.types import Similarity
from clm.engine.base import RowChunk, RowSource
from clm.methods.gaussians import GaussianSplatting
from clm.model.spec import gaussian_splatting_spec
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.render.splats import default_renderer
from clm.train.checkpoint import Checkpoint, save_checkpoint, state_blocks, state_columns
from clm.train.checkpoint_source import checkpoint_source
from clm.train.engine_factory import EngineOptions, make_engine

SPEC = gaussian_splatting_spec(3)
CHUNK = 1 << 20


def chunks(n: int):
    """A dense initial model: positions and colours random, everything else constant."""
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        yield RowChunk(
            {
                "means": torch.rand(m, 3, generator=g) * 100,
                "scales": torch.full((m, 3), math.log(0.05)),
                "quats": torch.tensor([1.0, 0, 0, 0]).repeat(m, 1),
                "opacities": torch.zeros(m),
                "sh0": torch.rand(m, 1, 3, generator=g) - 0.5,
                "shN": torch.zeros(m, 15, 3),
            }
        )


def engine_of(source: RowSource):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return make_engine(
        EngineOptions(offload="clm"),
        SPEC,
        source,
        default_renderer(device),
        LearningRates(SPEC, 10),
        AdamConfig(),
        device,
        1920 * 1080,
    )


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=20e6)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/clm-ckbench"))
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args()
    n = int(args.rows)
    shutil.rmtree(args.folder, ignore_errors=True)
    rows = []

    t = time.perf_counter()
    engine = engine_of(RowSource(n, chunks(n)))
    rows.append(("build from a stream", time.perf_counter() - t, None))

    saved = save_checkpoint(
        args.folder, 0, {}, state_columns(SPEC), state_blocks(engine.state_chunks())
    )
    rows.append(("save checkpoint", saved.seconds, saved.bytes))
    if not args.no_export:
        t = time.perf_counter()
        params = (c.params for c in engine.state_chunks())
        GaussianSplatting().export_ply(
            args.folder / "model.ply", SPEC, params, n, Similarity(1.0, torch.zeros(3).numpy())
        )
        size = (args.folder / "model.ply").stat().st_size
        rows.append(("export PLY (SH degree 3)", time.perf_counter() - t, size))
        (args.folder / "model.ply").unlink()
    engine.close()
    del engine

    t = time.perf_counter()
    loaded = engine_of(checkpoint_source(Checkpoint(saved.path), SPEC))
    rows.append(("load checkpoint", time.perf_counter() - t, saved.bytes))
    loaded.close()
    shutil.rmtree(args.folder, ignore_errors=True)

    print(
        f"{time.strftime('%Y-%m-%d')}, {n / 1e6:.0f}M Gaussians, peak RSS {peak_rss_gib():.1f} GiB"
    )
    print("| what | seconds | GB | GB/s |\n|---|---|---|---|")
    for what, seconds, size in rows:
        gb = f"{size / 1e9:.2f}" if size else "-"
        rate = f"{size / 1e9 / seconds:.2f}" if size else "-"
        print(f"| {what} | {seconds:.1f} | {gb} | {rate} |")


if __name__ == "__main__":
    main()
