"""Files shipped beside the code (kernels/, configs/): inside the installed package as
``clm.kernels`` and ``clm.configs``, or next to the package in a source checkout that is only
on ``PYTHONPATH``."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def package_folder(kind: str) -> Traversable:
    """The ``kernels`` or ``configs`` folder."""
    try:
        return resources.files(f"clm.{kind}")
    except ModuleNotFoundError:  # not installed: the checkout keeps it beside clm/
        return Path(__file__).resolve().parent.parent / kind


def kernel_source(name: str) -> bytes:
    """The bytes of ``kernels/<name>``."""
    return (package_folder("kernels") / name).read_bytes()
