"""Between the training frame and the user's: PLY export and import.

Training works in a normalised frame (``x_train = s·(x_world - c)``, see
:class:`clm.data.types.Similarity`). A uniform scale and a translation leave rotations and
view-dependent colour unchanged, so only positions and log-scales need converting.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clm.data.types import Similarity
from clm.model.ply import read_ply, write_ply
from clm.model.spec import GaussianSpec

log = logging.getLogger(__name__)


def params_to_world(params: dict[str, Tensor], to_train: Similarity) -> dict[str, np.ndarray]:
    out = {k: v.detach().cpu().float().numpy() for k, v in params.items()}
    out["means"] = to_train.to_world(out["means"].astype(np.float64)).astype(np.float32)
    out["scales"] = out["scales"] - np.float32(math.log(to_train.scale))
    return out


def world_to_params(
    splats: dict[str, np.ndarray], to_train: Similarity, spec: GaussianSpec
) -> dict[str, Tensor]:
    """PLY values as raw parameters in the training frame, fitted to the spec's SH degree."""
    params = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in splats.items()}
    means = to_train.to_train(np.asarray(splats["means"], dtype=np.float64))
    params["means"] = torch.as_tensor(means.astype(np.float32))
    params["scales"] = params["scales"] + math.log(to_train.scale)
    bands = spec["shN"].shape[0]
    rest = params["shN"]
    if rest.shape[1] != bands:
        log.warning("PLY has %d SH bands beyond degree 0; the model uses %d", rest.shape[1], bands)
        fitted = torch.zeros(rest.shape[0], bands, 3)
        keep = min(bands, rest.shape[1])
        fitted[:, :keep] = rest[:, :keep]
        params["shN"] = fitted
    return params


def export_ply(path: Path, params: dict[str, Tensor], to_train: Similarity) -> tuple[int, int]:
    """Write the INRIA PLY in the scene's own frame; returns (written, dropped non-finite)."""
    splats = params_to_world(params, to_train)
    dropped = write_ply(path, splats)
    return splats["means"].shape[0] - dropped, dropped


def import_ply(path: Path, to_train: Similarity, spec: GaussianSpec) -> dict[str, Tensor]:
    return world_to_params(read_ply(path), to_train, spec)
