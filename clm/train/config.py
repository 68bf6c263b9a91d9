"""Every training option in one dataclass: defaults here, presets in configs/*.toml, flags on top.

The help text of each flag lives next to its field, so ``clm-train --help`` and the presets can
never disagree about what an option means.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clm.errors import ClmError
from clm.package_data import package_folder


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    scene: Path | None = _opt(None, "scene folder: COLMAP (sparse/0 + images/) or transforms.json")
    output: Path = _opt(Path("runs/latest"), "output folder for checkpoints, PLY, metrics, renders")
    preset: str | None = _opt(
        None, "preset from configs/ (default, aerial, tiny) or a .toml file; default: default"
    )
    steps: int | None = _opt(
        None, "optimiser steps (default: 30000 images' worth, i.e. 30000 / batch size)"
    )
    batch_size: int = _opt(1, "images per optimiser step (micro-batches of one image, 1..64)")
    data_factor: int = _opt(1, "image downscale factor: uses images_F/ (or downsizes images/)")
    test_every: int = _opt(8, "hold out every K-th image (sorted by name) for evaluation; 0: none")
    seed: int = _opt(0, "random seed (CPU training is bit-for-bit deterministic)")
    device: str = _opt("auto", "cuda, cpu, or auto (cuda when available)")
    resume: bool = _opt(False, "continue from the latest checkpoint in the output folder")
    init_ply: Path | None = _opt(None, "start from a 3DGS PLY instead of the scene's points")
    max_seconds: float | None = _opt(None, "stop training after this many seconds, then finish")
    # model and recipe
    method: str = _opt("3dgs", "the splatting method (see the list above)")
    method_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "an option of the method, NAME=VALUE (repeatable; e.g. normal_weight=0.05)",
            "flag": "--method-option",
        },
    )
    sh_degree: int = _opt(3, "maximum spherical-harmonics degree (0..3)")
    sh_degree_every: int = _opt(1000, "raise the SH degree by one every this many images")
    ssim_weight: float = _opt(0.2, "weight of the D-SSIM term in the loss (rest is L1)")
    init_opacity: float = _opt(0.1, "opacity of the initial Gaussians")
    densify_start: int = _opt(500, "first image count at which density control runs")
    densify_stop: int = _opt(15_000, "image count after which density control stops")
    densify_every: int = _opt(100, "run density control every this many images")
    opacity_reset_every: int = _opt(3000, "reset opacities every this many images")
    grad_threshold: float = _opt(0.0002, "screen-space gradient above which Gaussians grow")
    max_gaussians: int | None = _opt(None, "never grow past this many Gaussians")
    # offloading and budgets
    offload: str = _opt("clm", "none (all on GPU), naive (all on host) or clm (key attrs on GPU)")
    max_gpu_gb: float | None = _opt(None, "hard cap on GPU memory this process may reserve, GiB")
    max_host_gb: float | None = _opt(None, "cap on pinned host memory for offloaded rows, GiB")
    cpu_threads: int | None = _opt(
        None, "threads for the CPU Adam (default: every core this process may use but one)"
    )
    # outputs
    checkpoint_every: int = _opt(
        1000, "save a checkpoint every this many steps (and on Ctrl-C, and at the end); 0: never"
    )
    keep_checkpoints: int = _opt(
        2, "checkpoints kept; an older one is deleted only once a newer one is complete"
    )
    eval_every: int = _opt(0, "evaluate on held-out views every this many steps (0: at the end)")
    log_every: int = _opt(10, "append to the training log every this many steps; 0: at the end")
    cache_dir: Path | None = _opt(None, "where decoded images are cached (default: output/cache)")
    progress: bool = _opt(True, "show a progress bar")
    tensorboard: bool = _opt(
        False,
        "write TensorBoard scalars and held-out renders to OUTPUT/tensorboard (clm[tensorboard])",
    )
    # watching this session (not kept for --resume)
    viewer: bool = _opt(
        False,
        "serve a live web viewer of the model as it trains, open until Ctrl-C after training "
        "(clm[viewer])",
    )
    viewer_port: int = _opt(8080, "port of the viewer (the next free one when taken)")
    viewer_fps: float = _opt(
        10.0,
        "most frames a second the viewer renders, on the training thread between steps; frames "
        "never take more than a fifth of its time",
    )

    def total_steps(self) -> int:
        return self.steps if self.steps is not None else max(1, 30_000 // self.batch_size)


BOOLEAN_FIELDS = {"resume", "progress", "tensorboard", "viewer"}  # on/off flags
# How this session is watched, not part of the run: --resume does not take them from it.
_SESSION_ONLY = ("viewer", "viewer_port", "viewer_fps")


def preset_path(name: str) -> Path:
    """A preset by name (shipped in configs/) or a path to a TOML file."""
    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ClmError(f"{path}: preset file not found")
        return path
    folder = package_folder("configs")
    shipped = folder / f"{name}.toml"
    if not shipped.is_file():
        names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))
        raise ClmError(f"unknown preset {name!r}; choose one of {', '.join(names)} or a .toml file")
    return Path(str(shipped))


def _coerce(name: str, value: Any) -> Any:
    """Check a preset value's type against the field's default type."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise ClmError(f"unknown option {name!r}")
    kind = fields[name].type
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            raise ClmError(f"option {name} = {value!r} has the wrong type (a table)")
        return dict(value)
    if value is None and "None" in kind:
        return None
    try:
        if "Path" in kind:
            return None if value is None else Path(value)
        if kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            return value
        if kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            return float(value)
        if kind == "bool" and not isinstance(value, bool):
            raise TypeError
    except TypeError:
        raise ClmError(f"option {name} = {value!r} has the wrong type ({kind})") from None
    return value


def load_preset(name: str) -> dict[str, Any]:
    path = preset_path(name)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ClmError(f"{path}: cannot read preset ({exc})") from None
    return {k: _coerce(k, v) for k, v in data.items()}


def make_config(given: dict[str, Any], base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then ``base`` (a resumed run's own config) or the preset, then explicit flags."""
    if base is not None:
        values = {k: v for k, v in base.items() if k not in _SESSION_ONLY}
    else:
        values = load_preset(given.get("preset") or "default")
    values.update(given)
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain values (paths as strings), for checkpoints and the run's config.json."""
    out = dataclasses.asdict(cfg)
    return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def config_from_dict(values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: _coerce(k, v) for k, v in values.items() if k in known}


# Intervals the trainer divides by, so 0 (which would mean "never") is refused for now.
def validate(cfg: TrainConfig) -> None:
    _check_finite(cfg)
    if cfg.scene is None and not cfg.resume:
        raise ClmError("no scene given (clm-train SCENE, or --resume with --output)")
    if not 1 <= cfg.batch_size <= 64:
        raise ClmError(f"--batch-size must be between 1 and 64, got {cfg.batch_size}")
    if not 0 <= cfg.sh_degree <= 3:
        raise ClmError(f"--sh-degree must be 0..3, got {cfg.sh_degree}")
    if cfg.keep_checkpoints < 1:
        raise ClmError(f"--keep-checkpoints must be at least 1, got {cfg.keep_checkpoints}")
    if cfg.data_factor < 1:
        raise ClmError(f"--data-factor must be at least 1, got {cfg.data_factor}")
    if cfg.max_gpu_gb is not None and cfg.max_gpu_gb <= 0:
        raise ClmError(f"--max-gpu-gb must be positive, got {cfg.max_gpu_gb}")
    if cfg.max_host_gb is not None and cfg.max_host_gb <= 0:
        raise ClmError(f"--max-host-gb must be positive, got {cfg.max_host_gb}")
    if not 0.0 <= cfg.ssim_weight <= 1.0:
        raise ClmError(f"--ssim-weight must be in [0, 1], got {cfg.ssim_weight}")
    if not 0.0 < cfg.init_opacity < 1.0:
        raise ClmError(f"--init-opacity must be in (0, 1), got {cfg.init_opacity}")
    if cfg.max_seconds is not None and cfg.max_seconds <= 0:
        raise ClmError(f"--max-seconds must be positive, got {cfg.max_seconds}")
    if cfg.cpu_threads is not None and cfg.cpu_threads < 1:
        raise ClmError(
            f"--cpu-threads must be at least 1, got {cfg.cpu_threads} "
            "(omit it for every core but one)"
        )
    if cfg.offload not in ("none", "naive", "clm"):
        raise ClmError(f"--offload must be none, naive or clm, got {cfg.offload!r}")
    if cfg.viewer_port > 65535:
        raise ClmError(f"--viewer-port must be at most 65535, got {cfg.viewer_port}")
    if cfg.viewer_fps <= 0:
        raise ClmError(f"--viewer-fps must be positive, got {cfg.viewer_fps}")
    from clm.methods.registry import make_method  # (imports the methods' renderers)

    make_method(cfg.method, cfg.method_options)  # an unknown method or option: one clear line
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ClmError(f"--device must be auto, cuda or cpu, got {cfg.device!r}")


def _check_finite(cfg: TrainConfig) -> None:
    """NaN passes every comparison in :func:`validate`, so float options are checked first."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            flag = "--" + f.name.replace("_", "-")
            raise ClmError(f"{flag} must be a finite number, got {value}")
