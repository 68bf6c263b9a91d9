"""The synthetic scene generator: files, pose conventions, ray casting, determinism, CLI errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from plyfile import PlyData

from clm.cli.synth import main
from clm.data.colmap import read_model
from clm.model.ply import open_ply, property_names, read_ply
from clm.synthetic.cameras import (
    AERIAL,
    STREET,
    Intrinsics,
    View,
    frustum_fractions,
    in_frustum,
    look_at,
    make_views,
)
from clm.synthetic.generate import PRESETS, generate_scene
from clm.synthetic.geometry import CityGeometry, build_city, load_geometry
from clm.synthetic.intersect import BOX, GROUND, MISS, SPHERE, box_hits, safe_inverse
from clm.synthetic.points import pixel_directions
from clm.synthetic.raycast import RayCaster
from clm.synthetic.surface import SurfaceSampler, sample_surface_points


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return generate_scene(out, "tiny", device="cpu", downscales=(2,), progress=False)


def test_tiny_scene_has_the_colmap_layout(tiny: Path) -> None:
    preset = PRESETS["tiny"]
    names = sorted(p.name for p in (tiny / "images").iterdir())
    assert len(names) == preset.images
    assert all(n.endswith(".png") for n in names)
    assert {n.split("_")[1].split(".")[0] for n in names} == {"aerial", "street"}
    with Image.open(tiny / "images" / names[0]) as im:
        assert im.size == (preset.width, preset.height)
        assert np.asarray(im).std() > 10  # an image, not a flat colour
    with Image.open(tiny / "images_2" / names[0]) as im:
        assert im.size == (preset.width // 2, preset.height // 2)
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        assert (tiny / "sparse" / "0" / name).is_file()

    model = read_model(tiny / "sparse" / "0")
    assert sorted(im.name for im in model.images.values()) == names
    (camera,) = model.cameras.values()
    assert (camera.model, camera.width, camera.height) == ("PINHOLE", preset.width, preset.height)
    assert len(model.points) == preset.points
    assert model.points.track_lengths.min() >= 1
    assert model.points.track_lengths.mean() > 1.5  # other views see most points too

    meta = json.loads((tiny / "synthetic.json").read_text())
    assert meta["generator"]["size"] == "tiny"
    geometry = load_geometry(tiny)
    assert len(geometry.boxes) == len(meta["geometry"]["boxes"])


def test_sparse_points_project_onto_the_pixels_that_saw_them(tiny: Path) -> None:
    """Read back, the poses put every point within a pixel of its source observation, and a ray
    cast through that pixel from that pose lands on the point: poses, intrinsics and pixel
    centres all follow the COLMAP conventions."""
    model = read_model(tiny / "sparse" / "0")
    (camera,) = model.cameras.values()
    fx, fy, cx, cy = camera.params
    intr = Intrinsics(camera.width, camera.height, fx, fy, cx, cy)
    caster = RayCaster(load_geometry(tiny), "cpu")
    pts = model.points
    first = np.concatenate([[0], np.cumsum(pts.track_lengths)[:-1]])
    by_image: dict[int, list[int]] = {}
    for i, j in enumerate(first):
        by_image.setdefault(int(pts.track_image_ids[j]), []).append(i)
    for image_id, ids in by_image.items():
        image = model.images[image_id]
        w2c = image.world_to_camera()
        slots = pts.track_point2d_idx[first[ids]]
        assert np.array_equal(image.point3d_ids[slots], pts.ids[ids])
        xy = image.xys[slots]
        cam = pts.xyz[ids] @ w2c[:3, :3].T + w2c[:3, 3]
        assert (cam[:, 2] > 0).all()
        uv = cam[:, :2] / cam[:, 2:] * [fx, fy] + [cx, cy]
        assert np.abs(uv - xy).max() < 1.0

        dirs = pixel_directions(w2c, intr, torch.as_tensor(xy, dtype=torch.float32))
        hits = caster.trace_view(w2c, intr, dirs)
        assert (hits.kind != MISS).all()
        hit = -w2c[:3, :3].T @ w2c[:3, 3] + hits.t.numpy()[:, None] * dirs.numpy()
        depth = cam[:, 2]
        assert (np.linalg.norm(hit - pts.xyz[ids], axis=1) < 0.02 + 0.01 * depth).all()


def test_every_track_entry_points_back_at_its_point(tiny: Path) -> None:
    model = read_model(tiny / "sparse" / "0")
    pts = model.points
    owner = np.repeat(pts.ids, pts.track_lengths)
    for image_id, slot, point_id in zip(
        pts.track_image_ids, pts.track_point2d_idx, owner, strict=True
    ):
        assert model.images[int(image_id)].point3d_ids[slot] == point_id


def test_ray_box_intersection_matches_brute_force_marching() -> None:
    gen = torch.Generator().manual_seed(3)
    lo = torch.rand(40, 3, generator=gen) * 20 - 10
    boxes = torch.cat([lo, lo + 1 + 4 * torch.rand(40, 3, generator=gen)], -1)
    origins = torch.rand(200, 3, generator=gen) * 40 - 20
    aim = torch.rand(200, 3, generator=gen) * 24 - 10 - origins  # mostly into the box cloud
    aim[150:] = torch.randn(50, 3, generator=gen)
    dirs = torch.nn.functional.normalize(aim, dim=-1)
    dirs[:5] = torch.tensor([1.0, 0.0, 0.0])  # axis-aligned rays exercise the zero components
    inside = ((origins[:, None] > boxes[:, :3]) & (origins[:, None] < boxes[:, 3:])).all(-1)
    origins, dirs = origins[~inside.any(1)], dirs[~inside.any(1)]

    t, k = box_hits(origins[None], safe_inverse(dirs)[None], boxes[None], torch.ones(1, 40).bool())
    t, k = t[0].double().numpy(), k[0].numpy()

    step = 0.005
    ts = np.arange(0, 60, step)
    o, d, b = origins.double().numpy(), dirs.double().numpy(), boxes.double().numpy()
    samples = o[:, None] + ts[None, :, None] * d[:, None]  # [R, steps, 3]
    first = np.full(len(o), np.inf)
    for box in b:
        ins = ((samples > box[:3]) & (samples < box[3:])).all(-1)
        hit = ins.any(1)
        first[hit] = np.minimum(first[hit], ts[ins[hit].argmax(1)])
    found = np.isfinite(first)
    assert found.sum() > 20 and (~found).sum() > 20
    assert np.array_equal(np.isfinite(t), found)
    assert np.allclose(t[found], first[found], atol=step + 1e-4)
    entry = o[found] + t[found, None] * d[found]
    chosen = b[k[found]]
    assert ((entry > chosen[:, :3] - 1e-4) & (entry < chosen[:, 3:] + 1e-4)).all()


def test_trace_hits_ground_spheres_and_boxes_at_analytic_distances() -> None:
    geometry = build_city(PRESETS["tiny"].city, 0)
    caster = RayCaster(geometry, "cpu")
    every_box = torch.arange(len(geometry.boxes))[None]
    every_sphere = torch.arange(len(geometry.spheres))[None]
    box = geometry.boxes[0]
    centre = [(box[0] + box[3]) / 2, (box[1] + box[4]) / 2]
    sphere = geometry.spheres[0]
    o = torch.tensor([[[*centre, 100.0], [-500.0, -500.0, 3.0], [*sphere[:2], 50.0]]])
    d = torch.tensor([[[0.0, 0.0, -1.0], [-0.6, 0.0, -0.8], [0.0, 0.0, -1.0]]])
    hits = caster.trace(o, d, every_box, every_sphere)
    assert hits.kind[0].tolist() == [BOX, GROUND, SPHERE]
    expected = [100 - box[5], 3 / 0.8, 50 - sphere[2] - sphere[3]]
    assert np.allclose(hits.t[0].numpy(), expected, atol=1e-3)
    assert hits.index[0, 0] == 0


def test_same_seed_same_scene_other_seed_other_city(tmp_path: Path) -> None:
    def files(seed: int, name: str) -> dict[str, bytes]:
        out = generate_scene(
            tmp_path / name, "tiny", images=4, points=60, seed=seed, device="cpu", progress=False
        )
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    a, b, c = files(5, "a"), files(5, "b"), files(6, "c")
    assert a == b
    assert (
        json.loads(a["synthetic.json"])["geometry"] != json.loads(c["synthetic.json"])["geometry"]
    )


def test_regenerating_drops_the_old_images(tmp_path: Path) -> None:
    def run(**options) -> None:
        generate_scene(
            tmp_path, "tiny", images=2, points=10, device="cpu", progress=False, **options
        )

    run(downscales=(2,), width=48)
    run(width=32)
    assert not (tmp_path / "images_2").exists()
    with Image.open(next((tmp_path / "images").iterdir())) as im:
        assert im.size == (32, 24)


@pytest.mark.parametrize("size", list(PRESETS))
def test_street_cameras_below_the_roofs_and_aerial_above(size: str) -> None:
    preset = PRESETS[size]
    geometry = build_city(preset.city, 1)
    rng = np.random.default_rng(1)
    views = make_views(geometry, 200, preset.aerial_fraction, "png", rng, preset.survey)
    lowest_roof, highest_roof = geometry.roof_range
    kinds = {v.kind for v in views}
    assert kinds == {AERIAL, STREET}
    x0, y0, x1, y1 = geometry.grid.bounds()
    for v in views:
        forward = v.world_to_camera[2, :3]
        if v.kind == STREET:
            assert 1.0 < v.center[2] < lowest_roof
            assert x0 <= v.center[0] <= x1 and y0 <= v.center[1] <= y1
        else:
            assert v.center[2] > highest_roof
            assert forward[2] < -0.3  # looking down at the city


def test_look_at_follows_the_opencv_convention() -> None:
    eye, target = np.array([3.0, -4.0, 10.0]), np.array([1.0, 2.0, 0.0])
    w2c = look_at(eye, target)
    assert np.allclose(w2c[:3, :3] @ w2c[:3, :3].T, np.eye(3))
    assert np.isclose(np.linalg.det(w2c[:3, :3]), 1.0)
    cam = w2c[:3, :3] @ target + w2c[:3, 3]
    assert np.allclose(cam[:2], 0) and cam[2] > 0  # the target is straight ahead
    above = w2c[:3, :3] @ (target + np.array([0, 0, 1])) + w2c[:3, 3]
    assert above[1] < 0  # world up is image up (y points down)


def surface_kinds(
    geometry: CityGeometry, xyz: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the points [N, 3] on a box face, on a tree sphere, on the ground (1 mm)."""
    b = geometry.boxes
    on_face = np.zeros(len(xyz), bool)
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        within = (
            (xyz[:, None, others] >= b[:, others] - 1e-3)
            & (xyz[:, None, others] <= b[:, [o + 3 for o in others]] + 1e-3)
        ).all(-1)
        for side in (axis, axis + 3):
            on_face |= (within & (np.abs(xyz[:, None, axis] - b[:, side]) < 1e-3)).any(1)
    s = geometry.spheres
    on_sphere = (np.abs(np.linalg.norm(xyz[:, None] - s[:, :3], axis=-1) - s[:, 3]) < 1e-3).any(1)
    return on_face, on_sphere, np.abs(xyz[:, 2]) < 1e-4


def test_surface_samples_lie_on_visible_surfaces(tiny: Path) -> None:
    geometry = load_geometry(tiny)
    xyz, rgb = sample_surface_points(geometry, 4000, seed=1, device="cpu")
    assert xyz.shape == (4000, 3) and xyz.dtype == np.float32
    assert rgb.shape == (4000, 3) and rgb.dtype == np.uint8
    again, _ = sample_surface_points(geometry, 4000, seed=1, device="cpu")
    assert np.array_equal(xyz, again)

    on_face, on_sphere, on_ground = surface_kinds(geometry, xyz)
    b = geometry.boxes
    assert (on_face | on_sphere | on_ground).all()
    assert on_face.sum() > 100 and on_ground.sum() > 100
    strictly_inside = ((xyz[:, None] > b[:, :3] + 1e-2) & (xyz[:, None] < b[:, 3:] - 1e-2)).all(-1)
    assert not strictly_inside.any()
    assert rgb.std(0).min() > 10


def test_cli_writes_a_scene(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path / "s"), "--images", "3", "--width", "40", "--points", "30"]
    assert main([*args, "--device", "cpu", "--seed", "2", "--quiet"]) == 0
    assert "3 images" in capsys.readouterr().out
    with Image.open(next((tmp_path / "s" / "images").iterdir())) as im:
        assert im.size == (40, 30)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--size", "huge"], "unknown --size 'huge'"),
        (["--dense", "0"], "--dense must be at least 1"),
        (["--dense", "-5", "--dense-only"], "--dense must be at least 1"),
        (["--dense", str(10**15)], "GB are free"),
        (["--dense-only"], "--dense-only needs --dense N"),
        (["--dense", "9", "--dense-only", "--size", "tiny"], "drop --size"),
        (["--dense", "9", "--dense-only"], "synthetic.json not found"),
        (["--images", "many"], "invalid int value"),
        (["--images", "0"], "--images must be at least 1"),
        (["--seed", "-3"], "--seed must be a non-negative integer"),
        (["--downscales", "2,x"], "comma-separated integers"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_cli_bad_option_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    assert main([str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err
    assert err.count("\n") == 1


def test_cli_unwritable_output_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([str(blocker / "scene"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to") and err.count("\n") == 1


def test_load_geometry_names_a_missing_scene(tmp_path: Path) -> None:
    from clm.errors import ClmError

    with pytest.raises(ClmError, match=r"synthetic\.json"):
        load_geometry(tmp_path)


def test_street_view_sees_buildings_and_aerial_sees_ground() -> None:
    preset = PRESETS["tiny"]
    geometry = build_city(preset.city, 0)
    caster = RayCaster(geometry, "cpu")
    intr = Intrinsics.from_fov(32, 24, preset.hfov)
    views = make_views(geometry, 12, 0.5, "png", np.random.default_rng(0))
    uv = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(24.0), indexing="xy"), -1)
    uv = uv.reshape(-1, 2) + 0.5
    for v in views:
        hits = caster.trace_view(
            v.world_to_camera, intr, pixel_directions(v.world_to_camera, intr, uv)
        )
        seen = set(hits.kind.tolist())
        if v.kind == AERIAL:
            assert GROUND in seen and BOX in seen
        assert math.isfinite(float(hits.t[hits.kind != MISS].max()))


# What the presets that predate metro produce, pinned: their cities (boxes, trees) and cameras
# (60 views from the generator's seed), and the tiny scene's pixels and sparse points. Sums are
# compared with a tolerance for float rounding on other CPUs, far below any real change.
_LAYOUTS = {
    "tiny": [18, 14, 3931.330662727356, 1610.0924899578094, 6156.56817423328, 9283.952075532125],
    "small": [64, 37, 20982.227225780487, 5793.797561645508, 9163.59962593886, 13626.57517083443],
    "medium": [
        210,
        130,
        84424.91451120377,
        26440.26255595684,
        12869.021368321884,
        18767.8176898041,
    ],
    "city": [
        2390,
        1415,
        3447313.2681577206,
        1009344.0308955908,
        27222.10756631233,
        48648.3095620041,
    ],
}


@pytest.mark.parametrize("size", list(_LAYOUTS))
def test_existing_presets_lay_out_the_same_city_and_cameras(size: str) -> None:
    preset = PRESETS[size]
    geometry = build_city(preset.city, 0)
    rng = np.random.default_rng([0, 0xCA3])
    views = make_views(geometry, 60, preset.aerial_fraction, "png", rng, preset.survey)
    poses = np.stack([v.world_to_camera for v in views])
    boxes, spheres = geometry.boxes.astype(np.float64), geometry.spheres.astype(np.float64)
    got = [len(boxes), len(spheres), boxes.sum(), spheres.sum(), poses.sum(), np.abs(poses).sum()]
    assert got == pytest.approx(_LAYOUTS[size], rel=1e-9)


def test_tiny_scene_renders_the_same_pixels_and_points(tiny: Path) -> None:
    pixels = sum(
        int(np.asarray(Image.open(p)).astype(np.int64).sum())
        for p in sorted((tiny / "images").iterdir())
    )
    assert pixels == pytest.approx(84875032, rel=1e-5)
    points = read_model(tiny / "sparse" / "0").points
    assert points.xyz.sum() == pytest.approx(334474.5966865481, rel=1e-7)
    assert int(points.rgb.astype(np.int64).sum()) == pytest.approx(818017, rel=1e-3)
    assert int(points.track_lengths.sum()) == pytest.approx(11599, rel=5e-3)


@pytest.fixture(scope="module")
def metro() -> tuple[CityGeometry, list[View], np.ndarray]:
    """The metro preset's city and its cameras (as the generator lays them out), and surface
    samples to measure what the views see; nothing is rendered."""
    preset = PRESETS["metro"]
    geometry = build_city(preset.city, 0)
    rng = np.random.default_rng([0, 0xCA3])
    views = make_views(geometry, preset.images, preset.aerial_fraction, "jpg", rng, preset.survey)
    points, _ = sample_surface_points(geometry, 8000, seed=0, device="cpu")
    return geometry, views, points.astype(np.float64)


def test_metro_aerial_views_see_a_few_blocks_each_and_the_whole_city_together(metro) -> None:
    geometry, views, points = metro
    preset = PRESETS["metro"]
    # What a view sees depends on its field of view, not on its resolution.
    intr = Intrinsics.from_fov(192, 108, preset.hfov)
    aerial = [v for v in views if v.kind == AERIAL]
    assert (len(views), len(aerial), len(preset.survey)) == (3600, 2400, 3)
    x0, y0, x1, y1 = geometry.grid.bounds()
    assert min(x1 - x0, y1 - y0) > 2000
    share = frustum_fractions(aerial, intr, points)
    by_altitude = np.median(share.reshape(3, -1), axis=1)  # the survey flies one altitude at a time
    assert 0.01 < by_altitude[0] < by_altitude[1] < by_altitude[2] < 0.05
    assert np.mean((share >= 0.01) & (share <= 0.05)) > 0.85
    assert share.max() < 0.1
    seen = np.zeros(len(points), bool)
    for view in aerial:
        seen |= in_frustum(view, intr, points)
    city = (points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0) & (points[:, 1] < y1)
    assert seen[city].all()

    street = frustum_fractions([v for v in views if v.kind == STREET], intr, points)
    assert np.median(street) < 0.005 and np.quantile(street, 0.9) < 0.02


def test_reduced_metro_scene_is_written(tmp_path: Path) -> None:
    generate_scene(tmp_path, "metro", images=3, width=64, points=60, device="cpu", progress=False)
    info = json.loads((tmp_path / "synthetic.json").read_text())["generator"]
    assert (info["size"], info["survey"], info["aerial_images"]) == ("metro", [250, 320, 390], 2)
    assert len(list((tmp_path / "images").iterdir())) == 3
    assert len(read_model(tmp_path / "sparse" / "0").points) == 60


def test_surface_samples_are_uniform_by_area_ground_included(tiny: Path) -> None:
    """Points per square metre are the same on the (one, huge) ground quad and on the roofs,
    once what buildings hide is taken off each."""
    geometry = load_geometry(tiny)
    xyz, _ = sample_surface_points(geometry, 30000, seed=2, device="cpu")
    b = geometry.boxes.astype(np.float64)
    footprint = (b[:, 3] - b[:, 0]) * (b[:, 4] - b[:, 1])
    x0, y0, x1, y1 = geometry.ground
    ground_area = (x1 - x0) * (y1 - y0) - footprint[b[:, 2] == 0].sum()
    roof_area = footprint.sum() - footprint[b[:, 2] > 0].sum()  # towers stand on roofs
    on_roof = (
        (np.abs(xyz[:, None, 2] - b[:, 5]) < 1e-3)
        & (xyz[:, None, :2] >= b[:, :2] - 1e-3).all(-1)
        & (xyz[:, None, :2] <= b[:, 3:5] + 1e-3).all(-1)
    ).any(1)
    ground = np.abs(xyz[:, 2]) < 1e-4
    assert ground.sum() > 5 * on_roof.sum() > 10_000
    ratio = (ground.sum() / ground_area) / (on_roof.sum() / roof_area)
    assert ratio == pytest.approx(1.0, abs=0.08)


def test_dense_only_samples_an_existing_scene_in_its_colmap_frame(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scene = tmp_path / "scene"
    scene.mkdir()
    shutil.copy(tiny / "synthetic.json", scene)  # the scene's images are not needed again
    assert main([str(scene), "--dense", "6000", "--dense-only", "--device", "cpu", "--quiet"]) == 0
    assert "6000 Gaussians" in capsys.readouterr().out
    assert sorted(p.name for p in scene.iterdir()) == ["dense_6000.ply", "synthetic.json"]
    path = scene / "dense_6000.ply"
    vertex = PlyData.read(str(path))["vertex"]
    assert vertex.count == 6000
    assert [p.name for p in vertex.properties] == property_names(0)  # 17 floats, no f_rest
    assert open_ply(path).sh_degree == 0

    splats = read_ply(path)
    xyz = splats["means"]
    geometry = load_geometry(tiny)
    on_face, on_sphere, on_ground = surface_kinds(geometry, xyz)
    assert (on_face | on_sphere | on_ground).all()
    assert 0.3 < on_ground.mean() < 0.95 and on_face.sum() > 500
    x0, y0, x1, y1 = geometry.ground
    assert (xyz[:, 0] >= x0).all() and (xyz[:, 0] <= x1).all()
    assert (xyz[:, 1] >= y0).all() and (xyz[:, 1] <= y1).all() and (xyz[:, 2] > -1e-4).all()
    # The COLMAP model's points (same frame) lie among the dense ones.
    sparse = torch.as_tensor(read_model(tiny / "sparse" / "0").points.xyz, dtype=torch.float32)
    spacing = math.exp(float(splats["scales"][0, 0]))
    nearest = torch.cdist(sparse, torch.as_tensor(xyz)).min(1).values
    assert float(nearest.median()) < spacing

    sampler = SurfaceSampler(geometry, "cpu")
    assert 0.85 < spacing / math.sqrt(sampler.total_area / 6000) <= 1.0
    assert (splats["scales"] == splats["scales"][0, 0]).all()
    assert (splats["quats"] == [1, 0, 0, 0]).all() and (splats["opacities"] == 0).all()
    rgb = sh_to_rgb_degree0(splats["sh0"][:, 0])
    assert (rgb > -1e-6).all() and (rgb < 1 + 1e-6).all() and rgb.std(0).min() > 0.04


def sh_to_rgb_degree0(sh0: np.ndarray) -> np.ndarray:
    return sh0 * 0.28209479177387814 + 0.5


def test_dense_with_a_new_scene(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    args = ["--images", "2", "--width", "32", "--points", "20", "--dense", "500"]
    assert main([str(out), *args, "--device", "cpu", "--quiet"]) == 0
    assert "2 images" in capsys.readouterr().out
    assert len(list((out / "images").iterdir())) == 2
    assert open_ply(out / "dense_500.ply").count == 500
