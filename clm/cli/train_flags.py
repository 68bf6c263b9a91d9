"""``clm-train``'s flags: one per :class:`~clm.train.config.TrainConfig` field, with its help,
its default once, and the chosen preset's value."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from clm.cli.common import OneLineParser
from clm.methods.registry import available_methods, describe_methods, parse_options
from clm.train.config import BOOLEAN_FIELDS, TrainConfig, load_preset


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
        description="Train a Gaussian splatting scene, offloading to host memory as needed. "
        f"Methods: {describe_methods()}.",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = _help(f, preset)
        if f.name == "scene":
            parser.add_argument("scene", type=Path, nargs="?", help=text)
        elif f.name == "method_options":
            parser.add_argument(
                f.metadata["flag"], dest=f.name, action="append", metavar="NAME=VALUE", help=text
            )
        elif f.name == "method":
            parser.add_argument(flag, choices=sorted(available_methods()), default=None, help=text)
        elif f.name in BOOLEAN_FIELDS:
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
    if f.default not in (None, dataclasses.MISSING) and "default" not in text:
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
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "method_options" in given:
        given["method_options"] = parse_options(given["method_options"])
    return given
