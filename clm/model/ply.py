"""The INRIA 3DGS PLY, the one splat format every viewer and tool reads, and its 2DGS variant.

3DGS layout (binary little endian, one ``vertex`` element, all float32, in this order):
``x y z``, ``nx ny nz`` (zeros), ``f_dc_0..2``, ``f_rest_0..3K-1``, ``opacity`` (logit),
``scale_0..2`` (log), ``rot_0..3`` (quaternion w, x, y, z, not necessarily normalised).
``f_rest`` is channel-major: ``f_rest_{c*K + k}`` holds SH coefficient ``k`` of colour channel
``c``.

2DGS layout (2D Gaussian splats, surfels): the same, but with two log-scales ``scale_0 scale_1``
(the disk's two tangent axes; its normal is the rotation's third axis) and no ``scale_2``, as
the 2DGS reference code (hbb1/2d-gaussian-splatting, ``GaussianModel.save_ply``) writes it.
``scales`` is ``[N, 2]`` then, ``[N, 3]`` for 3DGS; writing follows the data and reading follows
the file's ``scale_*`` properties (:attr:`PlySource.num_scales`). A 3DGS file that has lost its
``scale_2`` is indistinguishable from a 2DGS file, so a caller expecting one kind checks it.

Who reads a 2DGS file: the 2DGS reference code itself (its ``load_ply``, and through it its
``view.py`` feeding the 2DGS build of the SIBR remote viewer and the Viser-based 2DGS viewer
its README links). The 3DGS viewers (the stock SIBR viewer, web viewers such as SuperSplat or
antimatter15/splat, most splat tools) expect ``scale_2``: as far as we know they refuse such a
file or misread it, and even a file given a tiny third scale renders only approximately there
(3DGS's affine projection of a flat splat). Export a 3DGS model for those.

Models of a hundred million splats are written and read a chunk of rows at a time
(:func:`write_ply_stream`, :func:`open_ply`), never as a second full copy in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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


# How many log-scales a splat may have: 2 (2DGS surfels) or 3 (3DGS ellipsoids).
NUM_SCALES = (2, 3)


def property_names(num_rest_coeffs: int, num_scales: int = 3) -> list[str]:
    """Vertex property names in file order, for K = ``num_rest_coeffs`` coefficients per channel
    and ``num_scales`` log-scales (3: the 3DGS layout, 2: the 2DGS one)."""
    if num_scales not in NUM_SCALES:
        raise ValueError(f"num_scales is {num_scales}, want one of {NUM_SCALES}")
    return [
        *("x", "y", "z", "nx", "ny", "nz"),
        *(f"f_dc_{c}" for c in range(3)),
        *(f"f_rest_{i}" for i in range(3 * num_rest_coeffs)),
        "opacity",
        *(f"scale_{i}" for i in range(num_scales)),
        *(f"rot_{i}" for i in range(4)),
    ]


# What both layouts hold but the normals, which some exporters omit and nothing reads; the scales
# are counted apart (_num_scales).
_REQUIRED = tuple(name for name in property_names(0, 2) if name not in ("nx", "ny", "nz"))


def write_ply(path: Path, splats: dict[str, np.ndarray | torch.Tensor]) -> int:
    """Write ``splats`` (keys :data:`SPLAT_KEYS`) as a PLY; return how many rows were dropped.

    ``scales`` of shape ``[N, 3]`` gives the 3DGS layout, ``[N, 2]`` the 2DGS one.

    Rows holding any NaN or infinity are left out rather than poisoning the file: one bad splat
    must not cost the whole export. The file is replaced atomically, so a crash or a full disk
    leaves the previous file (or none), never half of one. Rows are converted and written in
    chunks (through :func:`write_ply_stream`), so a scene of a hundred million splats, on the GPU
    or in host memory, needs no second full copy.
    """
    path = Path(path)
    n, num_rest, num_scales = _check_shapes(path, splats)
    chunks = (
        {key: splats[key][start : start + _CHUNK_ROWS] for key in SPLAT_KEYS}
        for start in range(0, n, _CHUNK_ROWS)
    )
    return write_ply_stream(path, num_rest, n, chunks, num_scales=num_scales)[1]


def write_ply_stream(
    path: Path,
    num_rest: int,
    max_rows: int,
    chunks: Iterable[dict[str, np.ndarray | torch.Tensor]],
    *,
    num_scales: int = 3,
) -> tuple[int, int]:
    """Write a PLY from chunks of splats; return (rows written, non-finite rows dropped).

    Each chunk has the keys :data:`SPLAT_KEYS` with :func:`write_ply`'s shapes: ``shN`` is
    ``[m, num_rest, 3]`` and ``scales`` ``[m, num_scales]`` (3 writes the 3DGS layout, 2 the
    2DGS one; both counts are given because the header goes out before any chunk is seen).
    ``chunks`` is consumed once (a generator that cannot be replayed is fine) and only one chunk
    is packed at a time. The row count is only known at the end, so the header is written first
    with room for a count of ``max_rows``'s digits and rewritten last, padded to the same length
    inside a ``comment`` line, which every PLY reader skips. More than ``max_rows`` rows, or a
    chunk of other widths, is a ``ValueError`` (a caller's bug). The file is replaced
    atomically, as by :func:`write_ply`.
    """
    path = Path(path)
    if max_rows < 0:
        raise ValueError(f"{path}: max_rows is {max_rows}, want >= 0")
    try:
        sh_degree_of(num_rest)
    except ValueError as exc:
        raise ValueError(f"{path}: num_rest has a bad band count: {exc}") from exc
    if num_scales not in NUM_SCALES:
        raise ValueError(f"{path}: num_scales is {num_scales}, want one of {NUM_SCALES}")
    width = len(str(max_rows))
    counts = [0, 0]  # rows received, rows written

    def write(stream: BinaryIO) -> None:
        stream.write(_header(0, num_rest, num_scales, width))
        for chunk in chunks:
            m, chunk_rest, chunk_scales = _check_shapes(path, chunk)
            if chunk_rest != num_rest:
                raise ValueError(
                    f"{path}: a chunk has {chunk_rest} SH coefficients, want {num_rest}"
                )
            if chunk_scales != num_scales:
                raise ValueError(f"{path}: a chunk has {chunk_scales} scales, want {num_scales}")
            counts[0] += m
            if counts[0] > max_rows:
                raise ValueError(f"{path}: more than max_rows={max_rows} rows")
            packed = _pack_rows({key: _to_numpy(chunk[key]) for key in SPLAT_KEYS})
            finite = np.isfinite(packed).all(axis=1)
            if not finite.all():
                packed = packed[finite]
            stream.write(np.ascontiguousarray(packed, dtype="<f4").data)
            counts[1] += len(packed)
        stream.seek(0)
        stream.write(_header(counts[1], num_rest, num_scales, width))

    floats = len(property_names(num_rest, num_scales))
    header_bytes = len(_header(max_rows, num_rest, num_scales, width))
    atomic_write(path, write, needed=header_bytes + 4 * floats * max_rows)
    return counts[1], counts[0] - counts[1]


def _pack_rows(cols: dict[str, np.ndarray]) -> np.ndarray:
    """A chunk's rows as ``[M, P]`` float32 in file property order."""
    means = cols["means"]
    m = len(means)
    rest = cols["shN"]
    return np.concatenate(
        [
            means,
            np.zeros((m, 3), np.float32),
            cols["sh0"].reshape(m, 3),
            rest.transpose(0, 2, 1).reshape(m, 3 * rest.shape[1]),
            cols["opacities"].reshape(m, 1),
            cols["scales"],
            cols["quats"],
        ],
        axis=1,
    )


def _header(count: int, num_rest: int, num_scales: int, width: int) -> bytes:
    """The header, the same length for every ``count`` of at most ``width`` digits."""
    pad = width - len(str(count))
    lines = ["ply", "format binary_little_endian 1.0", "comment written by clm" + " " * pad]
    lines.append(f"element vertex {count}")
    lines += [f"property float {name}" for name in property_names(num_rest, num_scales)]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


@dataclass(frozen=True)
class PlySource:
    """A splat PLY whose header is checked and whose rows stay on disk until asked for.

    ``num_rest`` is K, the SH coefficients per channel beyond degree 0; ``num_scales`` is 3 for
    the 3DGS layout, 2 for the 2DGS one (the width of the ``scales`` read). Rows of a binary file
    are read with plain reads, a chunk at a time: no mapping keeps pages of a large file resident
    in the process (an ASCII file, parsed whole by plyfile, is held as parsed).
    """

    path: Path
    count: int
    num_rest: int
    num_scales: int
    _dtype: np.dtype = field(repr=False, compare=False)
    _offset: int | None = field(repr=False, compare=False)  # of the rows, in a binary file
    _parsed: np.ndarray | None = field(repr=False, compare=False)  # rows of an ASCII file

    @property
    def sh_degree(self) -> int:
        return sh_degree_of(self.num_rest)

    def _read(self, fh: BinaryIO | None, start: int, rows: int) -> np.ndarray:
        if self._parsed is not None or fh is None:
            return self._parsed[start : start + rows]
        rows = max(0, min(rows, self.count - start))
        out = np.empty(rows, self._dtype)
        fh.seek(self._offset + start * self._dtype.itemsize)
        if fh.readinto(memoryview(out.view(np.uint8))) != out.nbytes:
            raise ClmError(f"{self.path}: the PLY is shorter than its header says")
        return out

    def _open(self) -> BinaryIO | None:
        return None if self._parsed is not None else open(self.path, "rb")

    def chunks(self, rows: int = 1 << 20) -> Iterator[dict[str, np.ndarray]]:
        """Float32 arrays with :func:`read_ply`'s keys and shapes, ``rows`` rows at a time."""
        if rows <= 0:
            raise ValueError(f"rows is {rows}, want > 0")
        fh = self._open()
        try:
            for start in range(0, self.count, rows):
                yield _unpack_rows(self._read(fh, start, rows), self.num_rest, self.num_scales)
        finally:
            if fh is not None:
                fh.close()

    def sample(self, rows: int, runs: int = 64) -> dict[str, np.ndarray]:
        """About ``rows`` rows in ``runs`` short runs spread evenly through the file, for
        planning from a model without loading it (a few reads, whatever the model's size)."""
        per_run = max(1, -(-rows // runs))
        starts = np.linspace(0, max(self.count - per_run, 0), num=min(runs, self.count)).astype(int)
        fh = self._open()
        try:
            parts = [self._read(fh, int(start), per_run) for start in starts]
        finally:
            if fh is not None:
                fh.close()
        rows_read = np.concatenate(parts) if parts else np.empty(0, self._dtype)
        return _unpack_rows(rows_read, self.num_rest, self.num_scales)


def open_ply(path: Path) -> PlySource:
    """Open a 3DGS or 2DGS PLY for chunked reading; its header is checked here, no row is read.

    The SH degree comes from the number of ``f_rest`` properties, the layout from the ``scale_*``
    ones: ``scale_0..2`` is 3DGS, ``scale_0..1`` 2DGS, anything else an error. Normals are
    ignored (some exporters omit them); every other property of the layout must be present.
    """
    path = Path(path)
    if not path.is_file():
        raise ClmError(f"{path}: no such file")
    try:
        # Memory-mapped: plyfile's non-mapped binary reader parses row by row in Python.
        ply = PlyData.read(str(path), mmap="r")
    except Exception as exc:  # plyfile signals bad input with many exception types
        raise ClmError(f"{path}: not a readable PLY file ({reason(exc)})") from exc
    if "vertex" not in ply:
        raise ClmError(f"{path}: no 'vertex' element, so not a splat PLY")
    vertex = ply["vertex"]
    names = [prop.name for prop in vertex.properties]
    missing = [name for name in _REQUIRED if name not in names]
    if missing:
        raise ClmError(f"{path}: not a splat PLY, missing properties {', '.join(missing)}")
    num_rest = _num_rest_coeffs(path, names)
    num_scales = _num_scales(path, names)
    rows = vertex.data
    if isinstance(rows, np.memmap):  # binary: remember where the rows are, keep no mapping
        offset = int(rows.offset)
        return PlySource(path, vertex.count, num_rest, num_scales, rows.dtype, offset, None)
    return PlySource(path, vertex.count, num_rest, num_scales, rows.dtype, None, rows)


def read_ply(path: Path) -> dict[str, np.ndarray]:
    """Read a whole 3DGS or 2DGS PLY into the arrays :func:`write_ply` takes, as float32.

    ``scales`` has the file's 3 or 2 columns (see :func:`open_ply`). The result is the model
    itself; the file is read a chunk at a time into it (see :func:`open_ply` to avoid holding
    the model at all).
    """
    source = open_ply(path)
    out = _empty(source.count, source.num_rest, source.num_scales)
    start = 0
    for chunk in source.chunks():
        stop = start + len(chunk["means"])
        for key, value in chunk.items():
            out[key][start:stop] = value
        start = stop
    return out


def _shapes(n: int, num_rest: int, num_scales: int) -> dict[str, tuple[int, ...]]:
    """The shape of each splat array for ``n`` rows with ``num_rest`` SH coefficients a channel
    and ``num_scales`` log-scales."""
    return {
        "means": (n, 3),
        "scales": (n, num_scales),
        "quats": (n, 4),
        "opacities": (n,),
        "sh0": (n, 1, 3),
        "shN": (n, num_rest, 3),
    }


def _empty(n: int, num_rest: int, num_scales: int) -> dict[str, np.ndarray]:
    shapes = _shapes(n, num_rest, num_scales)
    return {key: np.empty(shape, np.float32) for key, shape in shapes.items()}


def _unpack_rows(rows: np.ndarray, num_rest: int, num_scales: int) -> dict[str, np.ndarray]:
    """Structured PLY rows as float32 splat arrays; reads each property once."""
    m = len(rows)
    out = _empty(m, num_rest, num_scales)
    flat = {key: value.reshape(m, -1) for key, value in out.items()}
    for i, name in enumerate(("x", "y", "z")):
        flat["means"][:, i] = rows[name]
    for i in range(num_scales):
        flat["scales"][:, i] = rows[f"scale_{i}"]
    for i in range(3):
        flat["sh0"][:, i] = rows[f"f_dc_{i}"]
    for i in range(4):
        flat["quats"][:, i] = rows[f"rot_{i}"]
    flat["opacities"][:, 0] = rows["opacity"]
    # f_rest_{c*K + k} is shN[k, c], column k*3 + c of the flattened [K, 3].
    for c in range(3):
        for k in range(num_rest):
            flat["shN"][:, k * 3 + c] = rows[f"f_rest_{c * num_rest + k}"]
    return out


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


def _num_scales(path: Path, names: list[str]) -> int:
    """2 or 3, from the ``scale_*`` properties, which must be ``scale_0..1`` or ``scale_0..2``."""
    scales = sorted(name for name in names if name.startswith("scale_"))
    for k in NUM_SCALES:
        if scales == [f"scale_{i}" for i in range(k)]:
            return k
    raise ClmError(
        f"{path}: scale properties are {', '.join(scales) or 'none'}; want scale_0, scale_1 "
        "(2DGS) or scale_0, scale_1, scale_2 (3DGS)"
    )


def _check_shapes(path: Path, splats: dict[str, np.ndarray | torch.Tensor]) -> tuple[int, int, int]:
    """(rows, K, scales per splat) of ``splats``, after checking the arrays' shapes against each
    other; ``scales`` may be ``[N, 3]`` (3DGS) or ``[N, 2]`` (2DGS)."""
    missing = [key for key in SPLAT_KEYS if key not in splats]
    if missing:
        raise ValueError(f"{path}: splats lack {', '.join(missing)}")
    shapes = {key: tuple(np.shape(splats[key])) for key in SPLAT_KEYS}
    n = shapes["means"][0] if len(shapes["means"]) == 2 else -1
    num_rest = shapes["shN"][1] if len(shapes["shN"]) == 3 else -1
    num_scales = 2 if shapes["scales"] == (n, 2) else 3
    for key, shape in _shapes(n, num_rest, num_scales).items():
        if shapes[key] != shape:
            want = f"({n}, 3) or ({n}, 2)" if key == "scales" else str(shape)
            raise ValueError(f"{path}: splats[{key!r}] has shape {shapes[key]}, want {want}")
    try:
        sh_degree_of(num_rest)
    except ValueError as exc:
        raise ValueError(f"{path}: splats['shN'] has a bad band count: {exc}") from exc
    return n, num_rest, num_scales


def _to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu", torch.float32).numpy()
    return np.asarray(array, dtype=np.float32)
