"""The INRIA 3DGS PLY and its 2DGS variant: layout checked with plyfile directly, round trips,
and bad input."""

import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from clm import files as files_module
from clm.errors import ClmError
from clm.model import ply as ply_module
from clm.model.ply import SPLAT_KEYS, read_ply, sh_degree_of, write_ply


def random_splats(n: int, num_rest: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def draw(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    return {
        "means": draw(n, 3),
        "scales": draw(n, 3),
        "quats": draw(n, 4),
        "opacities": draw(n),
        "sh0": draw(n, 1, 3),
        "shN": draw(n, num_rest, 3),
    }


def expected_names(num_rest: int) -> list[str]:
    """The INRIA property list, spelled out independently of the module."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * num_rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


@pytest.mark.parametrize("num_rest", [0, 3, 15])
def test_round_trip_is_bit_identical(tmp_path: Path, num_rest: int) -> None:
    splats = random_splats(37, num_rest)
    assert write_ply(tmp_path / "s.ply", splats) == 0
    back = read_ply(tmp_path / "s.ply")
    assert set(back) == set(splats)
    for key, value in splats.items():
        assert back[key].dtype == np.float32
        assert back[key].shape == value.shape
        assert back[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("num_rest", [0, 15])
def test_header_names_order_and_dtypes(tmp_path: Path, num_rest: int) -> None:
    write_ply(tmp_path / "s.ply", random_splats(4, num_rest))
    raw = (tmp_path / "s.ply").read_bytes()
    assert raw.startswith(b"ply\nformat binary_little_endian 1.0\n")
    data = PlyData.read(str(tmp_path / "s.ply"))
    assert [el.name for el in data.elements] == ["vertex"]
    vertex = data["vertex"]
    assert vertex.count == 4
    assert [p.name for p in vertex.properties] == expected_names(num_rest)
    assert all(p.val_dtype in ("f4", "float32", "float") for p in vertex.properties)
    assert vertex.data.dtype == np.dtype([(n, "<f4") for n in expected_names(num_rest)])
    # Header plus exactly N rows of float32, nothing else.
    header_len = raw.index(b"end_header\n") + len(b"end_header\n")
    assert len(raw) - header_len == 4 * 4 * len(expected_names(num_rest))
    np.testing.assert_array_equal(vertex["nx"], 0)


def test_channel_major_layout_against_hand_built_example(tmp_path: Path) -> None:
    # Degree 1: K = 3 coefficients per channel. Encode (k, c) as 10 * k + c + 1.
    k_count = 3
    shn = np.array([[[10 * k + c + 1 for c in range(3)] for k in range(k_count)]], dtype=np.float32)
    splats = {
        "means": np.array([[1, 2, 3]], np.float32),
        "scales": np.array([[-1, -2, -3]], np.float32),
        "quats": np.array([[0.5, 0.1, 0.2, 0.3]], np.float32),
        "opacities": np.array([0.25], np.float32),
        "sh0": np.array([[[7, 8, 9]]], np.float32),
        "shN": shn,
    }
    write_ply(tmp_path / "s.ply", splats)
    row = PlyData.read(str(tmp_path / "s.ply"))["vertex"].data[0]
    # f_rest_{c*K + k} = shN[k, c]: first all of red's coefficients, then green's, then blue's.
    rest = [float(row[f"f_rest_{i}"]) for i in range(9)]
    assert rest == [1, 11, 21, 2, 12, 22, 3, 13, 23]
    assert [float(row[f"f_dc_{c}"]) for c in range(3)] == [7, 8, 9]
    assert [float(row[n]) for n in ("x", "y", "z")] == [1, 2, 3]
    assert [float(row[f"scale_{i}"]) for i in range(3)] == [-1, -2, -3]
    assert [float(row[f"rot_{i}"]) for i in range(4)] == pytest.approx([0.5, 0.1, 0.2, 0.3])
    assert float(row["opacity"]) == 0.25


def test_accepts_torch_tensors(tmp_path: Path) -> None:
    splats = random_splats(6, 15, seed=3)
    tensors = {k: torch.from_numpy(v).double().requires_grad_() for k, v in splats.items()}
    write_ply(tmp_path / "s.ply", tensors)
    back = read_ply(tmp_path / "s.ply")
    for key, value in splats.items():
        np.testing.assert_array_equal(back[key], value)


def test_non_finite_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    splats = random_splats(10, 3, seed=1)
    splats["opacities"][2] = np.nan
    splats["means"][5, 1] = np.inf
    splats["shN"][7, 2, 0] = -np.inf
    assert write_ply(tmp_path / "s.ply", splats) == 3
    back = read_ply(tmp_path / "s.ply")
    keep = [0, 1, 3, 4, 6, 8, 9]
    for key, value in splats.items():
        np.testing.assert_array_equal(back[key], value[keep])


def test_rows_written_in_chunks_keep_their_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ply_module, "_CHUNK_ROWS", 4)
    splats = random_splats(11, 8, seed=2)
    splats["scales"][[1, 4, 10], 0] = np.nan  # bad rows in the first, second and last chunk
    assert write_ply(tmp_path / "s.ply", splats) == 3
    back = read_ply(tmp_path / "s.ply")
    keep = [0, 2, 3, 5, 6, 7, 8, 9]
    for key, value in splats.items():
        np.testing.assert_array_equal(back[key], value[keep])


def test_no_splats_at_all(tmp_path: Path) -> None:
    assert write_ply(tmp_path / "s.ply", random_splats(0, 15)) == 0
    assert PlyData.read(str(tmp_path / "s.ply"))["vertex"].count == 0
    assert read_ply(tmp_path / "s.ply")["shN"].shape == (0, 15, 3)


def test_all_rows_bad_gives_an_empty_but_valid_file(tmp_path: Path) -> None:
    splats = random_splats(3, 0)
    splats["opacities"][:] = np.nan
    assert write_ply(tmp_path / "s.ply", splats) == 3
    back = read_ply(tmp_path / "s.ply")
    assert back["means"].shape == (0, 3)
    assert back["shN"].shape == (0, 0, 3)


def test_write_replaces_atomically_and_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "s.ply"
    write_ply(target, random_splats(5, 0))
    before = target.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", disk_full)
    # 50 rows of 62 floats (expected_names(15)) and a header: 0.01 MB
    with pytest.raises(ClmError, match=r"no space left on .*\(up to 0\.01 MB needed; "):
        write_ply(target, random_splats(50, 15))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ply"]


def test_unwritable_folder_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ClmError, match=re.escape(str(blocker))):
        write_ply(blocker / "s.ply", random_splats(2, 0))
    with pytest.raises(ClmError, match="missing"):
        write_ply(tmp_path / "missing" / "s.ply", random_splats(2, 0))


def test_bad_shapes_are_rejected(tmp_path: Path) -> None:
    splats = random_splats(4, 15)
    splats["quats"] = splats["quats"][:, :3]
    with pytest.raises(ValueError, match="quats"):
        write_ply(tmp_path / "s.ply", splats)
    splats = random_splats(4, 14)
    with pytest.raises(ValueError, match="shN"):
        write_ply(tmp_path / "s.ply", splats)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "content",
    [b"", b"hello\n", b"ply\nformat binary_little_endian 1.0\nelement vertex 3\n"],
    ids=["empty", "not-ply", "header-cut"],
)
def test_unreadable_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ply"
    path.write_bytes(content)
    with pytest.raises(ClmError, match=r"bad\.ply"):
        read_ply(path)


def test_truncated_data(tmp_path: Path) -> None:
    write_ply(tmp_path / "s.ply", random_splats(20, 15))
    raw = (tmp_path / "s.ply").read_bytes()
    (tmp_path / "cut.ply").write_bytes(raw[:-7])
    with pytest.raises(ClmError, match=r"cut\.ply.*end-of-file"):
        read_ply(tmp_path / "cut.ply")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ClmError, match=r"nope\.ply"):
        read_ply(tmp_path / "nope.ply")


def write_header_only_ply(path: Path, names: list[str], rows: int = 1) -> None:
    header = ["ply", "format ascii 1.0", f"element vertex {rows}"]
    header += [f"property float {n}" for n in names]
    header += ["end_header"]
    body = [" ".join("0.5" for _ in names)] * rows
    path.write_text("\n".join(header + body) + "\n")


def test_missing_property_is_named(tmp_path: Path) -> None:
    names = [n for n in expected_names(0) if n != "rot_2"]
    write_header_only_ply(tmp_path / "s.ply", names)
    with pytest.raises(ClmError, match=r"s\.ply.*rot_2"):
        read_ply(tmp_path / "s.ply")


@pytest.mark.parametrize("rest_count", [4, 6, 3 * 14])
def test_f_rest_count_must_match_a_degree(tmp_path: Path, rest_count: int) -> None:
    names = expected_names(0)
    names[9:9] = [f"f_rest_{i}" for i in range(rest_count)]
    write_header_only_ply(tmp_path / "s.ply", names)
    with pytest.raises(ClmError, match=f"{rest_count} f_rest"):
        read_ply(tmp_path / "s.ply")


def test_f_rest_numbering_gap(tmp_path: Path) -> None:
    names = expected_names(3)
    names[names.index("f_rest_4")] = "f_rest_9"
    write_header_only_ply(tmp_path / "s.ply", names)
    with pytest.raises(ClmError, match="numbered"):
        read_ply(tmp_path / "s.ply")


def test_reads_ascii_files_without_normals(tmp_path: Path) -> None:
    names = [n for n in expected_names(3) if n not in ("nx", "ny", "nz")]
    write_header_only_ply(tmp_path / "s.ply", names, rows=2)
    back = read_ply(tmp_path / "s.ply")
    assert back["shN"].shape == (2, 3, 3)
    assert back["opacities"].shape == (2,)
    assert np.all(back["quats"] == 0.5)


def test_sh_degree_of() -> None:
    assert [sh_degree_of(k) for k in (0, 3, 8, 15)] == [0, 1, 2, 3]
    for bad in (-1, 1, 14, 16):
        with pytest.raises(ValueError):
            sh_degree_of(bad)


def chunked(splats: dict[str, np.ndarray], sizes: list[int]):
    """``splats`` cut into consecutive chunks of the given sizes, as a one-shot generator."""
    start = 0
    for size in sizes:
        yield {key: value[start : start + size] for key, value in splats.items()}
        start += size


def test_stream_round_trip_over_chunks_drops_non_finite_rows(tmp_path: Path) -> None:
    splats = random_splats(23, 3, seed=4)
    splats["quats"][[0, 9, 22], 1] = np.nan  # first, middle and last chunk
    splats["sh0"][12, 0, 2] = np.inf
    path = tmp_path / "s.ply"
    written, dropped = ply_module.write_ply_stream(path, 3, 10**6, chunked(splats, [5, 0, 11, 7]))
    assert (written, dropped) == (19, 4)
    keep = [i for i in range(23) if i not in (0, 9, 12, 22)]
    # plyfile, an independent reader, parses the padded header and finds the rows.
    vertex = PlyData.read(str(path))["vertex"]
    assert vertex.count == 19
    assert [p.name for p in vertex.properties] == expected_names(3)
    np.testing.assert_array_equal(vertex["x"], splats["means"][keep, 0])
    np.testing.assert_array_equal(vertex["f_rest_4"], splats["shN"][keep, 1, 1])
    np.testing.assert_array_equal(vertex["rot_1"], splats["quats"][keep, 1])
    back = read_ply(path)
    for key, value in splats.items():
        np.testing.assert_array_equal(back[key], value[keep])


def test_stream_header_is_padded_to_the_reserved_length(tmp_path: Path) -> None:
    splats = random_splats(12, 0)
    lengths = {}
    for count, max_rows in ((0, 99), (7, 99), (12, 99), (12, 10**9)):
        path = tmp_path / f"{count}-{max_rows}.ply"
        ply_module.write_ply_stream(path, 0, max_rows, chunked(splats, [count]))
        raw = path.read_bytes()
        header = raw[: raw.index(b"end_header\n") + len(b"end_header\n")]
        assert f"\nelement vertex {count}\n".encode() in header
        assert len(raw) - len(header) == count * 4 * 17
        assert PlyData.read(str(path))["vertex"].count == count
        lengths[count, max_rows] = len(header)
    # Room for the digits of max_rows, whatever the final count.
    assert lengths[0, 99] == lengths[7, 99] == lengths[12, 99] == lengths[12, 10**9] - 8


def test_stream_refuses_more_rows_than_announced(tmp_path: Path) -> None:
    splats = random_splats(10, 0)
    with pytest.raises(ValueError, match="max_rows"):
        ply_module.write_ply_stream(tmp_path / "s.ply", 0, 9, chunked(splats, [5, 5]))
    with pytest.raises(ValueError, match="SH coefficients"):
        ply_module.write_ply_stream(tmp_path / "s.ply", 3, 10, chunked(splats, [10]))
    assert not list(tmp_path.iterdir())


def test_stream_failing_midway_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "s.ply"
    write_ply(target, random_splats(5, 0))
    before = target.read_bytes()

    def failing():
        yield from chunked(random_splats(8, 0), [4])
        raise ClmError("source broke")

    with pytest.raises(ClmError, match="source broke"):
        ply_module.write_ply_stream(target, 0, 8, failing())
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ply"]


@pytest.mark.parametrize("rows", [1, 6, 20, 1000])
def test_open_ply_chunks_match_plyfile(tmp_path: Path, rows: int) -> None:
    write_ply(tmp_path / "s.ply", random_splats(20, 8, seed=5))
    source = ply_module.open_ply(tmp_path / "s.ply")
    assert (source.count, source.num_rest, source.sh_degree) == (20, 8, 2)
    chunks = list(source.chunks(rows))
    assert [len(c["means"]) for c in chunks] == [min(rows, 20 - s) for s in range(0, 20, rows)]
    vertex = PlyData.read(str(tmp_path / "s.ply"), mmap=False)["vertex"]
    got = {key: np.concatenate([c[key] for c in chunks]) for key in SPLAT_KEYS}
    for key in SPLAT_KEYS:
        assert got[key].dtype == np.float32
    np.testing.assert_array_equal(got["means"][:, 2], vertex["z"])
    np.testing.assert_array_equal(got["opacities"], vertex["opacity"])
    np.testing.assert_array_equal(got["scales"][:, 1], vertex["scale_1"])
    np.testing.assert_array_equal(got["sh0"][:, 0, 2], vertex["f_dc_2"])
    for c in range(3):
        for k in range(8):
            np.testing.assert_array_equal(got["shN"][:, k, c], vertex[f"f_rest_{c * 8 + k}"])


def test_open_ply_of_no_rows_gives_no_chunks(tmp_path: Path) -> None:
    write_ply(tmp_path / "s.ply", random_splats(0, 3))
    source = ply_module.open_ply(tmp_path / "s.ply")
    assert (source.count, source.sh_degree) == (0, 1)
    assert list(source.chunks()) == []


def test_open_ply_checks_the_header_like_read_ply(tmp_path: Path) -> None:
    names = [n for n in expected_names(0) if n != "opacity"]
    write_header_only_ply(tmp_path / "s.ply", names)
    with pytest.raises(ClmError, match=r"s\.ply.*opacity"):
        ply_module.open_ply(tmp_path / "s.ply")
    with pytest.raises(ClmError, match=r"nope\.ply"):
        ply_module.open_ply(tmp_path / "nope.ply")


def test_streaming_a_large_model_needs_memory_for_a_few_chunks_only(tmp_path: Path) -> None:
    n, chunk, props = 1_000_000, 1 << 15, 17
    model_bytes = n * props * 4
    rng = np.random.default_rng(0)

    def source():
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            yield {
                "means": rng.random((m, 3), np.float32),
                "scales": rng.random((m, 3), np.float32),
                "quats": rng.random((m, 4), np.float32),
                "opacities": rng.random(m, np.float32),
                "sh0": rng.random((m, 1, 3), np.float32),
                "shN": np.zeros((m, 0, 3), np.float32),
            }

    path = tmp_path / "big.ply"
    tracemalloc.start()
    try:
        assert ply_module.write_ply_stream(path, 0, n, source()) == (n, 0)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        rows = 0
        for part in ply_module.open_ply(path).chunks(chunk):
            rows += len(part["means"])
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == n
    assert path.stat().st_size > model_bytes
    # A packed chunk is 2.2 MB here; holding the model would take 68 MB.
    assert write_peak < model_bytes / 5, write_peak
    assert read_peak < model_bytes / 5, read_peak


def test_sample_reads_evenly_spread_runs_of_rows(tmp_path: Path) -> None:
    splats = random_splats(10_000, 3)
    splats["means"][:, 0] = np.arange(10_000)  # each row names itself
    write_ply(tmp_path / "s.ply", splats)
    sample = ply_module.open_ply(tmp_path / "s.ply").sample(1000, runs=10)
    rows = sample["means"][:, 0].astype(int)
    assert len(rows) == 1000 and rows[0] == 0 and rows[-1] == 9999
    runs = rows.reshape(10, 100)
    assert (np.diff(runs, axis=1) == 1).all()  # consecutive rows within a run
    assert (np.diff(runs[:, 0]) > 900).all()  # runs spread through the whole file
    np.testing.assert_array_equal(sample["shN"], splats["shN"][rows])


# --- The 2DGS layout: two log-scales per splat, no scale_2. ---


def random_surfels(n: int, num_rest: int, seed: int = 0) -> dict[str, np.ndarray]:
    """2DGS splats: :func:`random_splats` with ``scales`` of two columns."""
    splats = random_splats(n, num_rest, seed)
    splats["scales"] = np.ascontiguousarray(splats["scales"][:, :2])
    return splats


def expected_names_2dgs(num_rest: int) -> list[str]:
    """The property list hbb1/2d-gaussian-splatting's save_ply writes, spelled out by hand."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * num_rest)]
    names += ["opacity", "scale_0", "scale_1", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def assert_vertex_holds(vertex, splats: dict[str, np.ndarray], num_rest: int) -> None:
    """Every column of a plyfile ``vertex`` element against the splats it should hold."""
    for i, name in enumerate(("x", "y", "z")):
        np.testing.assert_array_equal(vertex[name], splats["means"][:, i])
        np.testing.assert_array_equal(vertex[f"n{name}"], 0)
    for c in range(3):
        np.testing.assert_array_equal(vertex[f"f_dc_{c}"], splats["sh0"][:, 0, c])
        for k in range(num_rest):
            np.testing.assert_array_equal(
                vertex[f"f_rest_{c * num_rest + k}"], splats["shN"][:, k, c]
            )
    np.testing.assert_array_equal(vertex["opacity"], splats["opacities"])
    for i in range(splats["scales"].shape[1]):
        np.testing.assert_array_equal(vertex[f"scale_{i}"], splats["scales"][:, i])
    for i in range(4):
        np.testing.assert_array_equal(vertex[f"rot_{i}"], splats["quats"][:, i])


@pytest.mark.parametrize("num_rest", [0, 3, 15])
def test_2dgs_write_matches_the_reference_layout(tmp_path: Path, num_rest: int) -> None:
    splats = random_surfels(29, num_rest, seed=7)
    path = tmp_path / "s.ply"
    assert write_ply(path, splats) == 0
    raw = path.read_bytes()
    assert raw.startswith(b"ply\nformat binary_little_endian 1.0\n")
    vertex = PlyData.read(str(path))["vertex"]
    assert vertex.count == 29
    assert [p.name for p in vertex.properties] == expected_names_2dgs(num_rest)
    assert "scale_2" not in vertex.data.dtype.names
    assert vertex.data.dtype == np.dtype([(n, "<f4") for n in expected_names_2dgs(num_rest)])
    header_len = raw.index(b"end_header\n") + len(b"end_header\n")
    assert len(raw) - header_len == 29 * 4 * len(expected_names_2dgs(num_rest))
    assert_vertex_holds(vertex, splats, num_rest)
    # And back through clm's reader, bit for bit, with two scale columns.
    source = ply_module.open_ply(path)
    assert (source.count, source.num_rest, source.num_scales) == (29, num_rest, 2)
    back = read_ply(path)
    assert back["scales"].shape == (29, 2)
    for key, value in splats.items():
        assert back[key].dtype == np.float32
        assert back[key].tobytes() == value.tobytes(), key


def test_2dgs_write_accepts_torch_tensors(tmp_path: Path) -> None:
    splats = random_surfels(5, 3, seed=8)
    tensors = {k: torch.from_numpy(v).double() for k, v in splats.items()}
    write_ply(tmp_path / "s.ply", tensors)
    back = read_ply(tmp_path / "s.ply")
    for key, value in splats.items():
        np.testing.assert_array_equal(back[key], value)


def write_with_plyfile(path: Path, names: list[str], rows: np.ndarray, text: bool = False) -> None:
    """A PLY written by plyfile itself, as the 2DGS reference code does."""
    data = np.empty(len(rows), dtype=[(n, "f4") for n in names])
    for i, name in enumerate(names):
        data[name] = rows[:, i]
    PlyData([PlyElement.describe(data, "vertex")], text=text).write(str(path))


@pytest.mark.parametrize("text", [False, True], ids=["binary", "ascii"])
def test_reads_a_2dgs_file_written_by_plyfile(tmp_path: Path, text: bool) -> None:
    num_rest, n = 3, 13
    names = expected_names_2dgs(num_rest)
    rows = np.random.default_rng(9).normal(size=(n, len(names))).astype(np.float32)
    col = {name: rows[:, i] for i, name in enumerate(names)}
    path = tmp_path / "ref.ply"
    write_with_plyfile(path, names, rows, text=text)
    source = ply_module.open_ply(path)
    assert (source.count, source.num_rest, source.num_scales) == (n, num_rest, 2)
    back = read_ply(path)
    assert {key: back[key].shape for key in SPLAT_KEYS} == {
        "means": (n, 3),
        "scales": (n, 2),
        "quats": (n, 4),
        "opacities": (n,),
        "sh0": (n, 1, 3),
        "shN": (n, num_rest, 3),
    }
    np.testing.assert_array_equal(back["scales"][:, 0], col["scale_0"])
    np.testing.assert_array_equal(back["scales"][:, 1], col["scale_1"])
    np.testing.assert_array_equal(back["means"][:, 1], col["y"])
    np.testing.assert_array_equal(back["opacities"], col["opacity"])
    np.testing.assert_array_equal(back["quats"][:, 3], col["rot_3"])
    np.testing.assert_array_equal(back["sh0"][:, 0, 1], col["f_dc_1"])
    for c in range(3):
        for k in range(num_rest):
            np.testing.assert_array_equal(back["shN"][:, k, c], col[f"f_rest_{c * num_rest + k}"])


def test_reads_a_2dgs_file_with_scales_out_of_order_and_no_normals(tmp_path: Path) -> None:
    names = [n for n in expected_names_2dgs(0) if n not in ("nx", "ny", "nz")]
    i0, i1 = names.index("scale_0"), names.index("scale_1")
    names[i0], names[i1] = names[i1], names[i0]
    rows = np.arange(3 * len(names), dtype=np.float32).reshape(3, len(names))
    write_with_plyfile(tmp_path / "s.ply", names, rows)
    back = read_ply(tmp_path / "s.ply")
    np.testing.assert_array_equal(back["scales"], rows[:, [names.index("scale_0"), i0]])


def test_2dgs_stream_over_chunks_drops_non_finite_rows(tmp_path: Path) -> None:
    splats = random_surfels(23, 8, seed=10)
    splats["scales"][[0, 9, 22], 1] = np.nan  # first, middle and last chunk
    splats["quats"][12, 0] = -np.inf
    path = tmp_path / "s.ply"
    chunks = chunked(splats, [5, 0, 11, 7])
    written, dropped = ply_module.write_ply_stream(path, 8, 10**6, chunks, num_scales=2)
    assert (written, dropped) == (19, 4)
    keep = [i for i in range(23) if i not in (0, 9, 12, 22)]
    vertex = PlyData.read(str(path))["vertex"]
    assert vertex.count == 19
    assert [p.name for p in vertex.properties] == expected_names_2dgs(8)
    assert_vertex_holds(vertex, {k: v[keep] for k, v in splats.items()}, 8)
    # Read back in several chunks, and sampled.
    source = ply_module.open_ply(path)
    assert (source.count, source.num_scales, source.sh_degree) == (19, 2, 2)
    parts = list(source.chunks(4))
    assert [len(p["means"]) for p in parts] == [4, 4, 4, 4, 3]
    for key, value in splats.items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value[keep])
    sample = source.sample(6, runs=3)
    assert sample["scales"].shape == (6, 2)
    assert sample["scales"][0].tobytes() == splats["scales"][keep[0]].tobytes()


def test_2dgs_stream_header_length_matches_its_rows(tmp_path: Path) -> None:
    splats = random_surfels(12, 0)
    path = tmp_path / "s.ply"
    ply_module.write_ply_stream(path, 0, 99, chunked(splats, [7]), num_scales=2)
    raw = path.read_bytes()
    header = raw[: raw.index(b"end_header\n") + len(b"end_header\n")]
    assert b"\nelement vertex 7\n" in header and b"scale_2" not in header
    assert len(raw) - len(header) == 7 * 4 * 16  # 17 floats of 3DGS less scale_2
    assert PlyData.read(str(path))["vertex"].count == 7


def test_stream_scale_count_must_match_the_chunks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 scales, want 3"):
        ply_module.write_ply_stream(tmp_path / "s.ply", 0, 9, chunked(random_surfels(4, 0), [4]))
    with pytest.raises(ValueError, match="3 scales, want 2"):
        chunks = chunked(random_splats(4, 0), [4])
        ply_module.write_ply_stream(tmp_path / "s.ply", 0, 9, chunks, num_scales=2)
    for bad in (1, 4):
        with pytest.raises(ValueError, match=f"num_scales is {bad}"):
            ply_module.write_ply_stream(tmp_path / "s.ply", 0, 9, iter([]), num_scales=bad)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("columns", [0, 1, 4])
def test_write_refuses_other_scale_widths(tmp_path: Path, columns: int) -> None:
    splats = random_splats(4, 0)
    splats["scales"] = np.zeros((4, columns), np.float32)
    with pytest.raises(ValueError, match=r"scales.*want \(4, 3\) or \(4, 2\)"):
        write_ply(tmp_path / "s.ply", splats)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "scales",
    [
        ["scale_0", "scale_1", "scale_2", "scale_3"],
        ["scale_0", "scale_1", "scale_3"],
        ["scale_0", "scale_1", "scale_x"],
        ["scale_0", "scale_1", "scale_02"],
    ],
    ids=["four", "gap", "garbled", "leading-zero"],
)
def test_other_scale_properties_are_one_clear_error(tmp_path: Path, scales: list[str]) -> None:
    names = expected_names_2dgs(0)
    at = names.index("scale_0")
    names[at : at + 2] = scales
    write_header_only_ply(tmp_path / "s.ply", names)
    with pytest.raises(ClmError, match=r"s\.ply: scale properties are .*want scale_0, scale_1 "):
        ply_module.open_ply(tmp_path / "s.ply")
    with pytest.raises(ClmError, match=r"s\.ply: scale properties"):
        read_ply(tmp_path / "s.ply")


@pytest.mark.parametrize("kept", [["scale_0"], ["scale_1", "scale_2"], []])
def test_too_few_scales_name_the_missing_one(tmp_path: Path, kept: list[str]) -> None:
    names = [n for n in expected_names(0) if not n.startswith("scale_") or n in kept]
    write_header_only_ply(tmp_path / "s.ply", names)
    missing = [n for n in ("scale_0", "scale_1") if n not in kept]
    with pytest.raises(
        ClmError, match=rf"s\.ply: not a splat PLY, missing properties {missing[0]}"
    ):
        read_ply(tmp_path / "s.ply")


def test_3dgs_behaviour_is_unchanged(tmp_path: Path) -> None:
    assert ply_module.property_names(15) == expected_names(15)
    assert ply_module.property_names(15, 3) == expected_names(15)
    assert ply_module.property_names(15, 2) == expected_names_2dgs(15)
    with pytest.raises(ValueError, match="num_scales"):
        ply_module.property_names(0, 4)
    splats = random_splats(9, 3, seed=11)
    path = tmp_path / "s.ply"
    # The stream's default (no num_scales) is the 3DGS layout, as before.
    assert ply_module.write_ply_stream(path, 3, 9, chunked(splats, [4, 5])) == (9, 0)
    vertex = PlyData.read(str(path))["vertex"]
    assert [p.name for p in vertex.properties] == expected_names(3)
    assert_vertex_holds(vertex, splats, 3)
    source = ply_module.open_ply(path)
    assert (source.count, source.num_rest, source.num_scales) == (9, 3, 3)
    back = read_ply(path)
    assert back["scales"].shape == (9, 3)
    for key, value in splats.items():
        assert back[key].tobytes() == value.tobytes(), key
    # write_ply of the same splats gives the very same bytes.
    write_ply(tmp_path / "w.ply", splats)
    assert (tmp_path / "w.ply").read_bytes()[-9 * 4 * 26 :] == path.read_bytes()[-9 * 4 * 26 :]
