"""What ``clm-render``, ``clm-eval`` and ``clm-export`` take: a run folder, a checkpoint or a PLY,
turned into parameters in the training frame of its scene, and an engine that renders them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clm.data.scene import load_scene
from clm.data.types import Scene, Similarity
from clm.engine.base import AdamSettings, Engine
from clm.engine.factory import make_engine
from clm.errors import ClmError
from clm.model.ply import read_ply, sh_degree_of
from clm.model.spec import gaussian_splatting_spec
from clm.render.splats import default_renderer
from clm.train.checkpoint import load_checkpoint, resolve_checkpoint
from clm.train.config import TrainConfig, config_from_dict
from clm.train.export import world_to_params
from clm.train.schedule import LearningRates, sh_degree_at
from clm.train.trainer import resolve_device


@dataclass
class Model:
    params: dict[str, Tensor]  # training frame
    to_train: Similarity
    sh_degree: int
    config: dict[str, Any]  # the run's options (empty for a PLY)


def add_source_arguments(parser: argparse.ArgumentParser, needs_scene: bool) -> None:
    parser.add_argument("source", type=Path, help="run folder, checkpoint (.pt) or PLY file")
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
    """Parameters from a PLY (needs ``scene`` for its frame) or a checkpoint."""
    if source.suffix.lower() == ".ply":
        if scene is None:
            raise ClmError(f"{source}: a PLY carries no scene; pass --scene")
        splats = read_ply(source)
        degree = sh_degree_of(splats["shN"].shape[1])
        spec = gaussian_splatting_spec(degree)
        return Model(world_to_params(splats, scene.to_train, spec), scene.to_train, degree, {})
    ckpt = load_checkpoint(resolve_checkpoint(source))
    config = ckpt["config"]
    to_train = Similarity(
        float(ckpt["to_train"]["scale"]), np.asarray(ckpt["to_train"]["center"], dtype=np.float64)
    )
    degree = sh_degree_at(
        int(ckpt["step"]),
        int(config["batch_size"]),
        int(config["sh_degree"]),
        int(config["sh_degree_every"]),
    )
    return Model(dict(ckpt["snapshot"]["params"]), to_train, degree, config)


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


def render_engine(model: Model, device_name: str, max_pixels: int) -> Engine:
    """An engine holding the model, for rendering only (offloaded on CUDA, as in training)."""
    device = resolve_device(device_name)
    spec = gaussian_splatting_spec(model.sh_degree)
    values = {k: v for k, v in model.config.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**config_from_dict(values))
    cfg.offload = cfg.offload if device.type == "cuda" else "none"
    params = {
        a.name: model.params[a.name][:, : a.shape[0]] if a.sh_rest else model.params[a.name]
        for a in spec
    }
    return make_engine(
        cfg,
        spec,
        params,
        default_renderer(device),
        LearningRates(spec, 1),
        AdamSettings(),
        device,
        max_pixels,
    )


def background_of(scene: Scene, device: torch.device) -> Tensor:
    return torch.tensor(scene.background, dtype=torch.float32, device=device)
