"""Every training option in one dataclass: defaults here, presets in configs/*.toml, flags on top.

The help text of each flag lives next to its field, so ``clm-train --help`` and the presets can
never disagree about what an option means.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clm.cli.common import OneLineParser
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
    cpu_threads: int | None = _opt(None, "threads for the CPU Adam (default: all cores)")
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


_BOOLEAN_FLAGS = {"resume", "progress", "tensorboard", "viewer"}
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


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


_count.__name__ = "non-negative integer"  # argparse names the type in its error message


def build_parser(
    prog: str = "clm-train", preset: tuple[str, dict[str, Any]] | None = None
) -> argparse.ArgumentParser:
    """The flags of every TrainConfig field; ``preset`` (name, values) adds its values to the
    help, so ``clm-train --preset tiny --help`` shows what that preset sets."""
    parser = OneLineParser(
        prog=prog,
        description="Train a 3D Gaussian Splatting scene, offloading to host memory as needed.",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = _help(f, preset)
        if f.name == "scene":
            parser.add_argument("scene", type=Path, nargs="?", help=text)
        elif f.name in _BOOLEAN_FLAGS:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            choices = {"offload": ["none", "naive", "clm"], "device": ["auto", "cuda", "cpu"]}
            parser.add_argument(
                flag,
                type=_converter(f.type),
                default=None,
                choices=choices.get(f.name),
                metavar=None if f.name in choices else f.name.upper(),
                help=text,
            )
    return parser


def _converter(kind: str) -> Any:
    if "Path" in kind:
        return Path
    if kind.startswith("int"):
        return _count
    if kind.startswith("float"):
        return float
    return str


def _help(f: dataclasses.Field, preset: tuple[str, dict[str, Any]] | None) -> str:
    """The field's help with its default once (unless the text already states it or there is
    none to state) and the chosen preset's value where it sets another."""
    text = f.metadata["help"]
    if f.default is not None and "default" not in text:
        text += f" (default: {f.default})"
    if preset is not None and preset[1].get(f.name, f.default) != f.default:
        text += f" (preset {preset[0]}: {preset[1][f.name]})"
    return text


def _preset_for_help(argv: list[str] | None) -> tuple[str, dict[str, Any]] | None:
    """The preset named with --preset, when --help is asked for too (otherwise not read here)."""
    args = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(args):
        return None
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset")
    name = early.parse_known_args(args)[0].preset
    return None if name is None else (name, load_preset(name))


def parse_flags(argv: list[str] | None = None) -> dict[str, Any]:
    """Only the flags the user gave, by field name."""
    args = build_parser(preset=_preset_for_help(argv)).parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


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
            f"--cpu-threads must be at least 1, got {cfg.cpu_threads} (omit it for all cores)"
        )
    if cfg.offload not in ("none", "naive", "clm"):
        raise ClmError(f"--offload must be none, naive or clm, got {cfg.offload!r}")
    if cfg.viewer_port > 65535:
        raise ClmError(f"--viewer-port must be at most 65535, got {cfg.viewer_port}")
    if cfg.viewer_fps <= 0:
        raise ClmError(f"--viewer-fps must be positive, got {cfg.viewer_fps}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ClmError(f"--device must be auto, cuda or cpu, got {cfg.device!r}")


def _check_finite(cfg: TrainConfig) -> None:
    """NaN passes every comparison in :func:`validate`, so float options are checked first."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            flag = "--" + f.name.replace("_", "-")
            raise ClmError(f"{flag} must be a finite number, got {value}")
