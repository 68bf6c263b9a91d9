"""The INRIA 3DGS PLY: the one splat format every viewer and tool reads.

Layout (binary little endian, one ``vertex`` element, all float32, in this order): ``x y z``,
``nx ny nz`` (zeros), ``f_dc_0..2``, ``f_rest_0..3K-1``, ``opacity`` (logit), ``scale_0..2``
(log), ``rot_0..3`` (quaternion w, x, y, z, not necessarily normalised). ``f_rest`` is
channel-major: ``f_rest_{c*K + k}`` holds SH coefficient ``k`` of colour channel ``c``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from plyfile import PlyData

from clm.errors import ClmError
from clm.files import atomic_write, reason

SPLAT_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")

# Rows packed per write: 64 MiB at SH degree 3, whatever the scene size.
_CHUNK_ROWS = 1 << 18


def sh_degree_of(num_rest_coeffs: int) -> int:
    """The SH degree ``d`` with ``(d + 1) ** 2 - 1 == num_rest_coeffs`` (coefficients per channel).

    Raises ``ValueError`` when no degree has that many higher-band coefficients.
    """
    degree = _degree_or_none(num_rest_coeffs)
    if degree is None:
        raise ValueError(f"{num_rest_coeffs} is not (d+1)^2 - 1 for any SH degree d")
    return degree


def _degree_or_none(num_rest_coeffs: int) -> int | None:
    if num_rest_coeffs < 0:
        return None
    root = math.isqrt(num_rest_coeffs + 1)
    return root - 1 if root * root == num_rest_coeffs + 1 else None


def property_names(num_rest_coeffs: int) -> list[str]:
    """Vertex property names in file order, for K = ``num_rest_coeffs`` coefficients per channel."""
    return [
        *("x", "y", "z", "nx", "ny", "nz"),
        *(f"f_dc_{c}" for c in range(3)),
        *(f"f_rest_{i}" for i in range(3 * num_rest_coeffs)),
        "opacity",
        *(f"scale_{i}" for i in range(3)),
        *(f"rot_{i}" for i in range(4)),
    ]


# Everything but the normals, which some exporters omit and nothing reads.
_REQUIRED = tuple(name for name in property_names(0) if name not in ("nx", "ny", "nz"))


def write_ply(path: Path, splats: dict[str, np.ndarray | torch.Tensor]) -> int:
    """Write ``splats`` (keys :data:`SPLAT_KEYS`) as a 3DGS PLY; return how many rows were dropped.

    Rows holding any NaN or infinity are left out rather than poisoning the file: one bad splat
    must not cost the whole export. The file is replaced atomically, so a crash or a full disk
    leaves the previous file (or none), never half of one. Rows are packed and written in chunks,
    so a scene of a hundred million splats needs no second full copy in memory.
    """
    path = Path(path)
    cols = _columns(path, splats)
    num_rest = cols["shN"].shape[1]
    n = cols["means"].shape[0]
    chunks = [slice(start, start + _CHUNK_ROWS) for start in range(0, n, _CHUNK_ROWS)]
    finite = [np.isfinite(_pack_rows(cols, rows)).all(axis=1) for rows in chunks]
    kept = sum(int(mask.sum()) for mask in finite)

    def write(stream: BinaryIO) -> None:
        stream.write(_header(kept, num_rest))
        for rows, mask in zip(chunks, finite, strict=True):
            packed = _pack_rows(cols, rows)[mask]
            stream.write(np.ascontiguousarray(packed, dtype="<f4").data)

    atomic_write(path, write)
    return n - kept


def _pack_rows(cols: dict[str, np.ndarray], rows: slice) -> np.ndarray:
    """Rows ``rows`` as ``[M, P]`` float32 in file property order."""
    means = cols["means"][rows]
    m = len(means)
    rest = cols["shN"][rows]
    return np.concatenate(
        [
            means,
            np.zeros((m, 3), np.float32),
            cols["sh0"][rows].reshape(m, 3),
            rest.transpose(0, 2, 1).reshape(m, 3 * rest.shape[1]),
            cols["opacities"][rows].reshape(m, 1),
            cols["scales"][rows],
            cols["quats"][rows],
        ],
        axis=1,
    )


def _header(count: int, num_rest: int) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
    lines += [f"property float {name}" for name in property_names(num_rest)]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def read_ply(path: Path) -> dict[str, np.ndarray]:
    """Read a 3DGS PLY back into the arrays :func:`write_ply` takes, as float32.

    The SH degree comes from the number of ``f_rest`` properties. Normals are ignored (some
    exporters omit them); every other property of the layout must be present.
    """
    path = Path(path)
    if not path.is_file():
        raise ClmError(f"{path}: no such file")
    try:
        # Memory-mapped: plyfile's non-mapped binary reader parses row by row in Python.
        ply = PlyData.read(str(path))
    except Exception as exc:  # plyfile signals bad input with many exception types
        raise ClmError(f"{path}: not a readable PLY file ({reason(exc)})") from exc
    if "vertex" not in ply:
        raise ClmError(f"{path}: no 'vertex' element, so not a 3DGS PLY")
    vertex = ply["vertex"]
    names = [prop.name for prop in vertex.properties]
    missing = [name for name in _REQUIRED if name not in names]
    if missing:
        raise ClmError(f"{path}: not a 3DGS PLY, missing properties {', '.join(missing)}")
    num_rest = _num_rest_coeffs(path, names)

    n = vertex.count

    def stack(keys: list[str]) -> np.ndarray:
        if not keys:
            return np.zeros((n, 0), np.float32)
        return np.stack([np.asarray(vertex[key], dtype=np.float32) for key in keys], axis=1)

    rest = stack([f"f_rest_{i}" for i in range(3 * num_rest)]).reshape(n, 3, num_rest)
    return {
        "means": stack(["x", "y", "z"]),
        "scales": stack([f"scale_{i}" for i in range(3)]),
        "quats": stack([f"rot_{i}" for i in range(4)]),
        "opacities": stack(["opacity"]).reshape(n),
        "sh0": stack([f"f_dc_{c}" for c in range(3)]).reshape(n, 1, 3),
        "shN": np.ascontiguousarray(rest.transpose(0, 2, 1)),
    }


def _num_rest_coeffs(path: Path, names: list[str]) -> int:
    """K, from the ``f_rest_*`` properties, which must be ``f_rest_0..3K-1`` for an SH degree."""
    rest = [name for name in names if name.startswith("f_rest_")]
    if set(rest) != {f"f_rest_{i}" for i in range(len(rest))}:
        raise ClmError(
            f"{path}: f_rest properties are not numbered f_rest_0..f_rest_{len(rest) - 1}"
        )
    num_rest, leftover = divmod(len(rest), 3)
    if leftover or _degree_or_none(num_rest) is None:
        raise ClmError(f"{path}: {len(rest)} f_rest properties do not match any SH degree")
    return num_rest


def _columns(path: Path, splats: dict[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
    """The splat arrays as float32 numpy, with their shapes checked against each other."""
    missing = [key for key in SPLAT_KEYS if key not in splats]
    if missing:
        raise ValueError(f"{path}: splats lack {', '.join(missing)}")
    cols = {key: _to_numpy(splats[key]) for key in SPLAT_KEYS}
    n = cols["means"].shape[0] if cols["means"].ndim == 2 else -1
    shn = cols["shN"]
    num_rest = shn.shape[1] if shn.ndim == 3 else -1
    expected = {
        "means": (n, 3),
        "scales": (n, 3),
        "quats": (n, 4),
        "opacities": (n,),
        "sh0": (n, 1, 3),
        "shN": (n, num_rest, 3),
    }
    for key, shape in expected.items():
        if cols[key].shape != shape:
            raise ValueError(f"{path}: splats[{key!r}] has shape {cols[key].shape}, want {shape}")
    try:
        sh_degree_of(num_rest)
    except ValueError as exc:
        raise ValueError(f"{path}: splats['shN'] has a bad band count: {exc}") from exc
    return cols


def _to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu", torch.float32).numpy()
    return np.asarray(array, dtype=np.float32)
