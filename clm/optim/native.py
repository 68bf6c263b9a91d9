"""Compile the C kernels shipped in ``clm.kernels`` at run time and load them with ctypes.

Builds are cached per user under ``$CLM_CACHE_DIR`` (default ``~/.cache/clm/kernels``) in a
folder named by a hash of the source, the flags, the compiler and the CPU, because
``-march=native`` code must not be reused on another machine. A build is written under a
temporary name and renamed into place, so processes compiling at once never see a partial
library. ctypes releases the GIL for the duration of each call, which lets the kernels run in a
background thread while Python keeps feeding the GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

from clm.package_data import kernel_source

_log = logging.getLogger(__name__)

# -ffp-contract=off: fuse multiply-adds only where the source asks (fmaf), to match torch.
# -fno-math-errno / -fno-trapping-math: let sqrt and the masked division vectorise; they do
# not change any result.
FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
)

_loaded: dict[tuple[str, str | None, str | None], ctypes.CDLL | None] = {}


class NativeBuildError(RuntimeError):
    """No configured C compiler could build a kernel."""


def library_path(name: str) -> Path:
    """Path of the shared library built from ``clm/kernels/<name>.c``, compiling it first when
    this source, compiler and machine have no cached build."""
    source = kernel_source(f"{name}.c")
    failures = []
    for compiler in _compilers():
        version = _compiler_version(compiler)
        if version is None:
            failures.append(f"{shlex.join(compiler)}: not runnable")
            continue
        parts = [source, shlex.join([*compiler, *FLAGS]).encode(), version, _machine_id().encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
        lib = _cache_root() / key / f"lib{name}.so"
        if lib.exists():
            return lib
        error = _compile(compiler, source, lib)
        if error is None:
            return lib
        failures.append(f"{shlex.join(compiler)}: {error}")
    raise NativeBuildError(f"cannot build {name}.c: " + "; ".join(failures))


def load(name: str) -> ctypes.CDLL | None:
    """The loaded kernel library ``name``, or None (with one warning) when it cannot be built.

    Cached per process for the current ``$CC`` and ``$CLM_CACHE_DIR``.
    """
    key = (name, os.environ.get("CC"), os.environ.get("CLM_CACHE_DIR"))
    if key not in _loaded:
        try:
            _loaded[key] = ctypes.CDLL(str(library_path(name)))
        except (NativeBuildError, OSError) as err:
            _log.warning("native %s kernel unavailable, using the torch fallback: %s", name, err)
            _loaded[key] = None
    return _loaded[key]


def _compilers() -> list[list[str]]:
    """``$CC`` when set (and then only it), else gcc, then cc."""
    cc = os.environ.get("CC")
    if cc:
        return [shlex.split(cc)]
    return [["gcc"], ["cc"]]


def _compiler_version(compiler: list[str]) -> bytes | None:
    try:
        done = subprocess.run([*compiler, "--version"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _compile(compiler: list[str], source: bytes, lib: Path) -> str | None:
    """Build ``source`` into ``lib`` atomically; returns None on success, else the error."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", dir=lib.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*compiler, *FLAGS, "-x", "c", "-", "-o", tmp, "-lm"],
            input=source,
            capture_output=True,
            timeout=300,
        )
        if done.returncode != 0:
            return done.stderr.decode(errors="replace").strip()[-2000:] or "compiler failed"
        os.replace(tmp, lib)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_root() -> Path:
    env = os.environ.get("CLM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "clm" / "kernels"


def _machine_id() -> str:
    """CPU architecture, model and feature flags: what ``-march=native`` code depends on."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if not line.strip() and lines:
                    break
    except OSError:
        lines.append(platform.processor())
    return "\n".join([platform.machine(), *lines])
