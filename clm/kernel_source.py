"""Where the sources in kernels/ are: inside the installed package (``clm.kernels``), or next to
the package in a source checkout that is only on ``PYTHONPATH``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def kernel_source(name: str) -> bytes:
    """The bytes of ``kernels/<name>``."""
    try:
        return (resources.files("clm.kernels") / name).read_bytes()
    except ModuleNotFoundError:  # not installed: the checkout keeps kernels/ beside clm/
        return (Path(__file__).resolve().parent.parent / "kernels" / name).read_bytes()
