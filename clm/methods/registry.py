"""Methods by name: the built-in ones and those other packages register.

A package adds a method without touching clm by naming its :class:`~clm.methods.base.Method`
subclass in the ``clm.methods`` entry-point group of its own ``pyproject.toml``::

    [project.entry-points."clm.methods"]
    mymethod = "my_package.module:MyMethod"

``clm-train --method mymethod`` then trains it, and ``--help`` lists it.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from importlib.metadata import entry_points
from typing import Any

from clm.errors import ClmError
from clm.methods.base import Method
from clm.methods.gaussians import GaussianSplatting
from clm.methods.surfels import Surfels

log = logging.getLogger("clm")

ENTRY_POINT_GROUP = "clm.methods"
BUILT_IN: dict[str, type[Method]] = {m.name: m for m in (GaussianSplatting, Surfels)}
DEFAULT_METHOD = GaussianSplatting.name


def available_methods() -> dict[str, type[Method]]:
    """Every method by name: the built-in ones, then the installed packages' (a package's
    method that fails to load is skipped with a warning, never breaking the others)."""
    methods = dict(BUILT_IN)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in methods:
            continue  # built-in names cannot be taken over
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plug-in must not stop clm
            log.warning("method %r from %s failed to load: %s", entry.name, entry.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            log.warning("method %r from %s is not a clm Method subclass", entry.name, entry.value)
            continue
        methods[entry.name] = cls
    return methods


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """The method ``name`` with ``options`` (field name to value; strings are converted to
    the field's type, as the command line gives them)."""
    methods = available_methods()
    cls = methods.get(name)
    if cls is None:
        raise ClmError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in (options or {}).items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ClmError(f"method {name} has no option {key!r} (its options: {known})")
        values[key] = _convert(name, key, value, hints[key]) if isinstance(value, str) else value
    return cls(**values)


def _convert(method: str, key: str, text: str, kind: Any) -> Any:
    """A command-line string as a value of the option's type."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() == "none":
            return None
        kind = args[0]
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", kind)
        raise ClmError(f"method {method} option {key}: {text!r} is not a valid {name}") from None


def parse_options(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` strings as a dict (the command line's ``--method-option``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ClmError(f"--method-option {item!r}: want NAME=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def describe_methods() -> str:
    """One line per method, for ``--help``."""
    return "; ".join(f"{name}: {cls.summary}" for name, cls in available_methods().items())
