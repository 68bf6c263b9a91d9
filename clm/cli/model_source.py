"""What ``clm-render``, ``clm-eval`` and ``clm-export`` take: a run folder, a checkpoint or a PLY,
opened as a stream of parameters in the training frame of its scene (never loaded whole), and an
engine that renders them."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clm.data.scene import load_scene
from clm.data.types import Scene, Similarity
from clm.devices import resolve_device
from clm.engine.base import Engine, RowSource
from clm.errors import ClmError
from clm.methods.base import Method
from clm.methods.registry import make_method
from clm.methods.surfels import Surfels
from clm.model.ply import open_ply
from clm.model.spec import GaussianSpec
from clm.optim.lazy_adam import AdamConfig
from clm.optim.learning_rates import LearningRates
from clm.train.checkpoint import open_checkpoint
from clm.train.checkpoint_source import checkpoint_source
from clm.train.config import TrainConfig, config_from_dict
from clm.train.engine_factory import EngineOptions, make_engine
from clm.train.recipe import sh_degree_at


@dataclass
class Model:
    """A model to render or export, of ``method``; ``rows()`` streams its parameters (training
    frame) for the spec of ``sh_degree``, each call from the start."""

    method: Method
    rows: Callable[[GaussianSpec], RowSource]
    count: int
    to_train: Similarity
    sh_degree: int
    config: dict[str, Any]  # the run's options (empty for a PLY)


def add_source_arguments(parser: argparse.ArgumentParser, needs_scene: bool) -> None:
    parser.add_argument("source", type=Path, help="run folder, checkpoint (.ckpt) or PLY file")
    if needs_scene:
        parser.add_argument(
            "--scene", type=Path, help="scene folder (default: the one the run trained on)"
        )
        parser.add_argument("--data-factor", type=int, help="image downscale factor")
        parser.add_argument("--test-every", type=int, help="held-out split, as in training")
        parser.add_argument(
            "--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to render"
        )


def load_model(source: Path, scene: Scene | None = None) -> Model:
    """A PLY (needs ``scene`` for its frame) or a checkpoint, opened, not read."""
    if source.suffix.lower() == ".ply":
        if scene is None:
            raise ClmError(f"{source}: a PLY carries no scene; pass --scene")
        ply = open_ply(source)
        if ply.count == 0:
            raise ClmError(f"{source}: the PLY holds no Gaussians")
        # the file's layout says its method: two scales are 2DGS's
        method = make_method(Surfels.name if ply.num_scales == 2 else "3dgs")
        return Model(
            method,
            lambda spec: method.ply_source(source, spec, scene.to_train),
            ply.count,
            scene.to_train,
            ply.sh_degree,
            {},
        )
    ckpt = open_checkpoint(source)
    config = ckpt.meta["config"]
    to_train = Similarity(
        float(ckpt.meta["to_train"]["scale"]),
        np.asarray(ckpt.meta["to_train"]["center"], dtype=np.float64),
    )
    degree = sh_degree_at(
        ckpt.step,
        int(config["batch_size"]),
        int(config["sh_degree"]),
        int(config["sh_degree_every"]),
    )
    options = {"ssim_weight": config.get("ssim_weight", 0.2), **config.get("method_options", {})}
    return Model(
        make_method(config.get("method", "3dgs"), options),
        lambda spec: checkpoint_source(ckpt, spec, moments=False),
        ckpt.count,
        to_train,
        degree,
        config,
    )


def scene_for(args: argparse.Namespace) -> tuple[Scene, Model]:
    """Load the scene (from ``--scene`` or the run's config) and the model in its frame."""
    model = None
    run_config: dict[str, Any] = {}
    if args.source.suffix.lower() != ".ply":
        model = load_model(args.source)
        run_config = model.config
    scene_path = args.scene or (Path(run_config["scene"]) if run_config.get("scene") else None)
    if scene_path is None:
        raise ClmError(f"{args.source}: no scene known; pass --scene")
    factor = args.data_factor or int(run_config.get("data_factor", 1))
    test_every = (
        args.test_every if args.test_every is not None else int(run_config.get("test_every", 8))
    )
    scene = load_scene(scene_path, factor, test_every)
    if model is None:
        model = load_model(args.source, scene)
    return scene, model


def render_engine(
    model: Model, device_name: str, max_pixels: int, depth: bool = False, training: bool = False
) -> Engine:
    """An engine holding the model, for rendering only (offloaded on CUDA, as in training);
    with ``depth`` its renders carry the expected depth as a fourth channel, with ``training``
    the channels the method's loss reads (2DGS: depth, normals, distortion)."""
    device = resolve_device(device_name)
    spec = model.method.spec(model.sh_degree)
    values = {k: v for k, v in model.config.items() if k in TrainConfig.__dataclass_fields__}
    options = EngineOptions.of(TrainConfig(**config_from_dict(values)))
    if device.type != "cuda":
        options = dataclasses.replace(options, offload="none")
    return make_engine(
        options,
        spec,
        model.rows(spec),
        model.method.renderer(device, depth, training),
        LearningRates(spec, 1),
        AdamConfig(),
        device,
        max_pixels,
    )


def background_of(scene: Scene, device: torch.device) -> Tensor:
    return torch.tensor(scene.background, dtype=torch.float32, device=device)
