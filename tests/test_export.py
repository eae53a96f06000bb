"""Tests of text3d.export: marching cubes, UV atlas, texture bake, OBJ/GLB round trips, turntables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from text3d.errors import ConfigError, UserError
from text3d.export import (ExportConfig, bake_texture, check_export_config, export_asset, extract_mesh,
                           extract_mesh_from_grid, sample_density_grid, unwrap_uv, write_turntable)
from text3d.export import turntable as turntable_mod
from text3d.export.bake import rasterize_uv


def sphere_density(center=(0.0, 0.0, 0.0), radius=0.5):
    """Signed distance style density: positive inside, zero on the sphere."""
    c = torch.tensor(center, dtype=torch.float32)
    return lambda p: radius - (p - c).norm(dim=-1)


def position_color(p: torch.Tensor) -> torch.Tensor:
    return ((p + 1.0) / 2.0).clamp(0.0, 1.0)


def sample_bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear lookup at continuous pixel coordinates (integer = texel centre), clamped at the edges."""
    h, w = image.shape[:2]
    img = image.astype(np.float64) / 255.0
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def sample_uv(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """OBJ/trimesh convention: v up, image row 0 = v 1."""
    h, w = image.shape[:2]
    return sample_bilinear(image, uv[:, 0] * w - 0.5, (1.0 - uv[:, 1]) * h - 0.5)


# ----------------------------------------------------------------------------------------------- marching


def test_sphere_surface_radius_watertight_outward():
    calls = []

    def density(p):
        calls.append((p.shape[0], torch.is_grad_enabled()))
        return sphere_density()(p)

    cfg = ExportConfig(grid_resolution=64, threshold=0.0)
    mesh = extract_mesh(density, 1.0, cfg)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert np.all(np.abs(radii - 0.5) < 0.02 * 0.5)
    assert mesh.is_watertight
    assert mesh.volume > 0
    assert mesh.volume == pytest.approx(4.0 / 3.0 * np.pi * 0.5 ** 3, rel=0.03)
    # every face normal points away from the centre
    outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center)
    assert np.all(outward > 0)
    # density_fn contract: chunks of at most 65536 points, no autograd
    assert max(n for n, _ in calls) <= 65536 and not any(g for _, g in calls)
    assert sum(n for n, _ in calls) == 64 ** 3


def test_axis_order_sphere_lands_where_placed():
    center = np.array([0.15, -0.25, 0.45])  # distinct x, y, z: any axis swap or flip moves it
    cfg = ExportConfig(grid_resolution=48, threshold=0.0)
    mesh = extract_mesh(sphere_density(tuple(center), 0.3), 1.0, cfg)
    assert np.allclose(mesh.vertices.mean(axis=0), center, atol=0.02)
    assert mesh.bounds[0, 2] > 0.1  # entirely on the +Z side
    # the grid path agrees: grid[i, j, k] is (x_i, y_j, z_k)
    grid = sample_density_grid(sphere_density(tuple(center), 0.3), 1.0, 48)
    axis = np.linspace(-1, 1, 48)
    i, j, k = np.unravel_index(np.argmax(grid), grid.shape)
    assert np.allclose([axis[i], axis[j], axis[k]], center, atol=2.0 / 47)
    again = extract_mesh_from_grid(grid, 1.0, cfg)
    assert np.allclose(np.sort(again.vertices, axis=0), np.sort(mesh.vertices, axis=0), atol=1e-5)


def test_surface_touching_the_bound_is_closed():
    # a sphere that sticks out of the +X wall: the padded grid closes it with a cap
    cfg = ExportConfig(grid_resolution=32, threshold=0.0)
    mesh = extract_mesh(sphere_density((0.8, 0.0, 0.0), 0.5), 1.0, cfg)
    assert mesh.is_watertight and mesh.volume > 0
    assert mesh.vertices[:, 0].max() <= 1.0 + 2.0 / 31


def test_auto_threshold_finds_blob_surface():
    def blob(p):  # smooth positive density, like a NeRF density-blob initialisation
        x, y, z = p.unbind(-1)
        return 20.0 * torch.exp(-((x / 0.5) ** 2 + (y / 0.35) ** 2 + (z / 0.4) ** 2))

    cfg = ExportConfig(grid_resolution=40, threshold=None)
    mesh = extract_mesh(blob, 1.0, cfg)
    level = mesh.metadata["iso_level"]
    assert 0.0 < level < 20.0
    assert len(mesh.faces) > 100 and mesh.is_watertight and mesh.volume > 0
    # the vertices lie on the chosen level set, inside the bound
    values = blob(torch.as_tensor(mesh.vertices, dtype=torch.float32)).numpy()
    assert np.median(np.abs(values - level)) < 0.1 * level
    assert np.abs(mesh.vertices).max() < 1.0


@pytest.mark.parametrize("density, threshold", [
    (lambda p: torch.zeros(p.shape[0]), None),  # empty field, automatic level
    (lambda p: torch.full((p.shape[0],), 3.0), None),  # constant field
    (sphere_density(), 0.9),  # a level above the field's maximum (0.5)
])
def test_no_surface_raises_user_error(density, threshold):
    with pytest.raises(UserError) as info:
        extract_mesh(density, 1.0, ExportConfig(grid_resolution=16, threshold=threshold))
    assert "\n" not in str(info.value)


def test_small_components_removed():
    big, small = sphere_density((-0.35, 0.0, 0.0), 0.45), sphere_density((0.65, 0.0, 0.0), 0.08)

    def two_spheres(p):
        return torch.maximum(big(p), small(p))

    kept = extract_mesh(two_spheres, 1.0, ExportConfig(grid_resolution=48, threshold=0.0))
    assert len(kept.split(only_watertight=False)) == 1
    assert kept.vertices[:, 0].max() < 0.2
    both = extract_mesh(two_spheres, 1.0, ExportConfig(grid_resolution=48, threshold=0.0, min_component_fraction=0.0))
    assert len(both.split(only_watertight=False)) == 2


def test_decimate_keeps_the_sphere_closed_and_round():
    from text3d.export.decimate import decimate

    full = extract_mesh(sphere_density(radius=0.5), 1.0, ExportConfig(grid_resolution=64, threshold=0.0, max_faces=0))
    small = decimate(full, 1500)
    assert len(full.faces) > 8000
    assert 1200 <= len(small.faces) <= 1500
    assert small.is_watertight and small.volume > 0
    radii = np.linalg.norm(small.vertices, axis=1)
    assert np.abs(radii - 0.5).max() < 0.02  # quadric collapse keeps vertices on the surface
    assert abs(small.volume / full.volume - 1.0) < 0.03
    assert decimate(small, 10_000) is small  # under the target: untouched


def test_export_decimates_to_max_faces_and_writes_vertex_colour_ply(tmp_path):
    cfg = ExportConfig(grid_resolution=48, threshold=0.0, texture_size=64, max_faces=800)
    files = export_asset(sphere_density(), position_color, 1.0, tmp_path, "ball", cfg, formats=("glb", "ply"))
    assert files["faces"] <= 800 + 8  # seams of the atlas do not add faces; the decimator may overshoot slightly
    ply = trimesh.load(files["ply"], force="mesh", process=False)
    assert len(ply.faces) <= 800 and ply.is_watertight
    colours = np.asarray(ply.visual.vertex_colors)[:, :3].astype(np.float64) / 255.0
    expected = ((ply.vertices + 1.0) / 2.0).clip(0, 1)
    assert np.abs(colours - expected).max() < 1.0 / 255.0 + 1e-6  # each vertex carries the albedo at its position
    with pytest.raises(UserError):
        export_asset(sphere_density(), position_color, 1.0, tmp_path, "ball", cfg, formats=("stl",))


def test_export_config_from_yaml_and_checks():
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(ExportConfig), OmegaConf.create("texture_size: 256\nthreshold: 5"))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ExportConfig) and cfg.texture_size == 256 and cfg.threshold == 5.0
    check_export_config(merged)
    with pytest.raises(ConfigError):
        check_export_config(ExportConfig(texture_size=0))


# ----------------------------------------------------------------------------------------------- UV + bake


def test_rasterize_orientation_row0_is_v1():
    # two triangles covering the unit UV square, 3D point = (u, v, 0)
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float32)
    verts = np.c_[uv, np.zeros(4)].astype(np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    size = 16
    texels, points, _ = rasterize_uv(verts, faces, uv, size)
    assert len(texels) == size * size  # every texel exactly once
    r, c = np.divmod(texels, size)
    assert np.allclose(points[:, 0], (c + 0.5) / size, atol=1e-6)
    assert np.allclose(points[:, 1], 1.0 - (r + 0.5) / size, atol=1e-6)


@pytest.fixture(scope="module")
def unwrapped_sphere():
    mesh = extract_mesh(sphere_density(), 1.0, ExportConfig(grid_resolution=32, threshold=0.0))
    return mesh, unwrap_uv(mesh, texture_size=256, padding=2)


def test_unwrap_shapes(unwrapped_sphere):
    mesh, (v, f, uv) = unwrapped_sphere
    assert v.dtype == np.float32 and f.dtype == np.int32 and uv.dtype == np.float32
    assert len(v) >= len(mesh.vertices) and len(f) == len(mesh.faces) and uv.shape == (len(v), 2)
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    # same surface: every unwrapped vertex is one of the original vertices
    assert np.allclose(np.sort(np.unique(v.round(5), axis=0), axis=0),
                       np.sort(np.unique(mesh.vertices.astype(np.float32).round(5), axis=0), axis=0))


def test_bake_matches_color_fn_at_vertices(unwrapped_sphere):
    _, (v, f, uv) = unwrapped_sphere
    texture = bake_texture(v, f, uv, position_color, size=256, padding=4)
    assert texture.shape == (256, 256, 3) and texture.dtype == np.uint8
    expected = position_color(torch.from_numpy(v)).numpy()
    err = np.abs(sample_uv(texture, uv) - expected).mean()
    assert err < 0.03
    # a vertically flipped texture (row 0 = v 0) must not pass the same check
    assert np.abs(sample_uv(texture[::-1], uv) - expected).mean() > 3 * err


def test_bake_padding_fills_border_texels(unwrapped_sphere):
    _, (v, f, uv) = unwrapped_sphere
    size = 256
    texels, _, _ = rasterize_uv(v, f, uv, size)
    covered = np.zeros(size * size, bool)
    covered[texels] = True
    covered = covered.reshape(size, size)
    padded = bake_texture(v, f, uv, position_color, size=size, padding=4)
    bare = bake_texture(v, f, uv, position_color, size=size, padding=0)
    assert np.array_equal(padded[covered], bare[covered])
    # ring: empty texels with a covered 8-neighbour; each must copy a neighbouring island colour
    pad_cov = np.pad(covered, 1)
    pad_img = np.pad(padded.astype(int), ((1, 1), (1, 1), (0, 0)))
    ring = np.zeros_like(covered)
    matched = np.zeros_like(covered)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == dc == 0:
                continue
            nb_cov = pad_cov[1 + dr:1 + dr + size, 1 + dc:1 + dc + size]
            nb_img = pad_img[1 + dr:1 + dr + size, 1 + dc:1 + dc + size]
            ring |= nb_cov & ~covered
            matched |= nb_cov & (nb_img == padded).all(axis=-1)
    assert ring.sum() > 100
    assert matched[ring].all()
    # without padding the ring holds one flat fill colour instead
    assert len(np.unique(bare[ring], axis=0)) == 1
    assert not np.array_equal(padded[ring], bare[ring])


# ----------------------------------------------------------------------------------------------- files


def _glb_raw_uv_and_image(path):
    """TEXCOORD_0 exactly as stored in the .glb (glTF convention: v down) and the embedded image."""
    import io

    import pygltflib

    gltf = pygltflib.GLTF2().load_binary(str(path))
    blob = gltf.binary_blob()
    prim = gltf.meshes[0].primitives[0]

    def accessor(idx, dtype, width):
        acc = gltf.accessors[idx]
        view = gltf.bufferViews[acc.bufferView]
        start = (view.byteOffset or 0) + (acc.byteOffset or 0)
        return np.frombuffer(blob, dtype=dtype, count=acc.count * width, offset=start).reshape(acc.count, width)

    uv = accessor(prim.attributes.TEXCOORD_0, np.float32, 2)
    pos = accessor(prim.attributes.POSITION, np.float32, 3)
    material = gltf.materials[prim.material]
    tex = gltf.textures[material.pbrMetallicRoughness.baseColorTexture.index]
    view = gltf.bufferViews[gltf.images[tex.source].bufferView]
    data = blob[(view.byteOffset or 0):(view.byteOffset or 0) + view.byteLength]
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return pos, uv, image, material


def test_export_asset_round_trip(tmp_path):
    cfg = ExportConfig(grid_resolution=32, threshold=0.0, texture_size=128, seam_padding=4)
    density = sphere_density(radius=0.6)
    out = export_asset(density, position_color, 1.0, tmp_path, "a_red_ball-run1", cfg)
    assert set(out) == {"obj", "mtl", "texture", "glb", "faces", "vertices", "seconds"}
    assert set(out["seconds"]) == {"unwrap", "bake", "write"} and min(out["seconds"].values()) >= 0
    for key in ("obj", "mtl", "texture", "glb"):
        assert out[key].exists() and "a_red_ball-run1" in out[key].name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a_red_ball-run1.obj", "a_red_ball-run1.mtl", "a_red_ball-run1_albedo.png", "a_red_ball-run1.glb"])
    # references by relative name
    assert "mtllib a_red_ball-run1.mtl" in out["obj"].read_text()
    assert "map_Kd a_red_ball-run1_albedo.png" in out["mtl"].read_text()
    albedo = np.asarray(Image.open(out["texture"]).convert("RGB"))
    assert albedo.shape == (128, 128, 3)

    for key in ("obj", "glb"):
        loaded = trimesh.load(out[key], force="mesh")
        assert loaded.visual.uv is not None and loaded.visual.uv.shape == (len(loaded.vertices), 2)
        material = loaded.visual.material
        image = material.baseColorTexture if key == "glb" else material.image
        assert image is not None and image.size == (128, 128)
        assert len(loaded.faces) == out["faces"]
        expected = position_color(torch.as_tensor(loaded.vertices, dtype=torch.float32)).numpy()
        got = sample_uv(np.asarray(image.convert("RGB")), loaded.visual.uv)
        assert np.abs(got - expected).mean() < 0.03, key
        radii = np.linalg.norm(loaded.vertices, axis=1)
        assert np.abs(radii - 0.6).max() < 0.05  # no axis swap / scale on the way
    obj_image = np.asarray(trimesh.load(out["obj"], force="mesh").visual.material.image.convert("RGB"))
    assert np.array_equal(obj_image, albedo)

    # the raw glTF, read without trimesh: v is stored flipped (row 0 = v 0 in glTF) and the material is PBR
    pos, raw_uv, image, material = _glb_raw_uv_and_image(out["glb"])
    got = sample_bilinear(image, raw_uv[:, 0] * 128 - 0.5, raw_uv[:, 1] * 128 - 0.5)
    assert np.abs(got - position_color(torch.from_numpy(pos.copy())).numpy()).mean() < 0.03
    assert material.pbrMetallicRoughness.metallicFactor == 0.0
    assert material.pbrMetallicRoughness.roughnessFactor == pytest.approx(0.9)

    # a second run into the same folder: new files, the first run's untouched
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out2 = export_asset(density, position_color, 1.0, tmp_path, "a_red_ball-run2", cfg, formats=("glb",))
    assert set(out2) == {"glb", "faces", "vertices", "seconds"}
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "a_red_ball-run2.glb"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def test_export_asset_rejects_bad_name_and_format(tmp_path):
    cfg = ExportConfig(grid_resolution=16, texture_size=32)
    with pytest.raises(UserError):
        export_asset(sphere_density(), position_color, 1.0, tmp_path, "../escape", cfg)
    with pytest.raises(UserError):
        export_asset(sphere_density(), position_color, 1.0, tmp_path, "ok", cfg, formats=("fbx",))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- turntable


def _frames(n=10, h=50, w=70):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]  # distinct frames (GIF would merge equal ones)


def test_turntable_mp4(tmp_path):
    import imageio.v2 as iio

    path = write_turntable(_frames(), tmp_path / "cat.run.1", fps=12)
    assert path == tmp_path / "cat.run.1.mp4" and path.stat().st_size > 0
    reader = iio.get_reader(path, format="FFMPEG")
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 10
    assert frames[0].shape == (64, 80, 3)  # padded to multiples of 16, not resized
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.run.1.mp4"]


def test_turntable_gif_fallback(tmp_path, monkeypatch):
    import imageio.v2 as iio

    path = write_turntable(_frames(), tmp_path / "forced", fps=12, prefer_mp4=False)
    assert path.suffix == ".gif" and len(iio.mimread(path)) == 10

    def no_ffmpeg():
        raise RuntimeError("ffmpeg not found")

    monkeypatch.setattr(turntable_mod, "_ffmpeg_exe", no_ffmpeg)
    path = write_turntable(_frames(), tmp_path / "auto", fps=12)
    assert path == tmp_path / "auto.gif"
    frames = iio.mimread(path)
    assert len(frames) == 10 and frames[0].shape[:2] == (50, 70)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.gif", "forced.gif"]


@pytest.mark.skipif(__import__("text3d.export.validate", fromlist=["x"]).validator_node_path() is None,
                    reason="the Khronos glTF validator (node + npm gltf-validator) is not installed here")
def test_exported_glb_passes_the_khronos_gltf_validator(tmp_path):
    from text3d.export.validate import validate_gltf

    cfg = ExportConfig(grid_resolution=32, threshold=0.0, texture_size=128, seam_padding=4)
    out = export_asset(sphere_density(radius=0.6), position_color, 1.0, tmp_path, "ball", cfg, formats=("glb",))
    report = validate_gltf([out["glb"]])[0]
    assert report["errors"] == 0, report["messages"]


def test_smoothing_removes_roughness_and_keeps_volume():
    """A sphere with voxel-scale noise in its density: Taubin smoothing brings the vertices' distances to the
    centre back towards one radius, without shrinking the mesh."""
    import numpy as np

    from text3d.export.marching import extract_mesh_from_grid

    res, bound = 48, 1.0
    axis = np.linspace(-bound, bound, res)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    rng = np.random.default_rng(0)
    grid = (0.6 - np.sqrt(x**2 + y**2 + z**2) + 0.03 * rng.standard_normal((res,) * 3)).astype(np.float32)
    rough = extract_mesh_from_grid(grid, bound, ExportConfig(threshold=0.0, smooth_iterations=0))
    smooth = extract_mesh_from_grid(grid, bound, ExportConfig(threshold=0.0, smooth_iterations=50))
    r_rough = np.linalg.norm(rough.vertices, axis=1)
    r_smooth = np.linalg.norm(smooth.vertices, axis=1)
    assert r_smooth.std() < 0.8 * r_rough.std()  # measured 0.74
    assert abs(smooth.volume / rough.volume - 1.0) < 0.05


def test_closed_cavities_are_filled_and_open_ones_kept():
    """A hollow ball (a closed pocket inside) exports as one outer shell with fill_cavities on (the default) and
    as two nested shells with it off; a cup (an open hollow, like the world's mug) keeps its opening either way."""
    outer, inner = sphere_density(radius=0.6), sphere_density(radius=0.35)

    def hollow(p):
        return torch.minimum(outer(p), -inner(p))

    cfg = dict(grid_resolution=48, threshold=0.0, smooth_iterations=0, min_component_fraction=0.0)
    filled = extract_mesh(hollow, 1.0, ExportConfig(**cfg))
    shells = extract_mesh(hollow, 1.0, ExportConfig(fill_cavities=False, **cfg))
    assert len(filled.split(only_watertight=False)) == 1
    assert len(shells.split(only_watertight=False)) == 2
    assert filled.volume == pytest.approx(4 / 3 * np.pi * 0.6 ** 3, rel=0.05)
    assert shells.volume == pytest.approx(4 / 3 * np.pi * (0.6 ** 3 - 0.35 ** 3), rel=0.08)

    def cup(p):  # the hollow ball opened at the top: the pocket reaches the outside
        return torch.minimum(hollow(p), 0.3 - p[:, 1])

    opened = extract_mesh(cup, 1.0, ExportConfig(**cfg))
    assert opened.volume == pytest.approx(extract_mesh(cup, 1.0, ExportConfig(fill_cavities=False, **cfg)).volume)
    assert opened.volume < 0.85 * filled.volume


def test_opacity_fit_moves_the_surface_in_until_its_silhouettes_match():
    """extract_mesh_matching: a soft ball whose 'renders' show a ball 0.03 smaller than Otsu's surface (r = 0.62):
    the surface moved inwards along its normals by the best offset matches those silhouettes better than Otsu's
    mesh, is nearer the rendered radius and keeps its faces and smoothness."""
    from text3d.cameras import spherical_cameras
    from text3d.export.marching import SURFACE_OFFSETS, extract_mesh_matching
    from text3d.renderers.mesh import MeshAsset, render_mesh
    from text3d.utils.masks import silhouette_iou

    def soft_ball(p):  # density 8 at the centre falling linearly to 0 at r = 0.7
        return (8.0 * (1.0 - p.norm(dim=-1) / 0.7)).clamp_min(0.0)

    cams = spherical_cameras(torch.tensor([15.0, 15.0, 60.0]), torch.tensor([0.0, 120.0, 240.0]), 2.8, 42.0)

    def silhouettes(mesh):
        asset = MeshAsset(torch.as_tensor(mesh.vertices, dtype=torch.float32), torch.as_tensor(mesh.faces))
        return render_mesh(asset, cams, 64, 64, shading="albedo")["opacity"]

    cfg = ExportConfig(grid_resolution=64)
    otsu_mesh = extract_mesh(soft_ball, 1.0, cfg)
    target = silhouettes(trimesh.creation.icosphere(subdivisions=3, radius=0.59))
    chosen = extract_mesh_matching(soft_ball, 1.0, cfg, silhouettes, target)
    assert [d for d, _ in chosen.metadata["offset_scores"]] == list(SURFACE_OFFSETS)
    assert chosen.metadata["surface_offset"] in SURFACE_OFFSETS[1:]
    assert chosen.metadata["iso_level"] == otsu_mesh.metadata["iso_level"]
    assert np.mean(silhouette_iou(silhouettes(chosen), target)) > np.mean(silhouette_iou(silhouettes(otsu_mesh), target)) + 0.05
    r_otsu, r_chosen = (np.linalg.norm(m.vertices, axis=1) for m in (otsu_mesh, chosen))
    assert abs(r_chosen.mean() - 0.59) < 0.01 < abs(r_otsu.mean() - 0.59)
    assert np.array_equal(chosen.faces, otsu_mesh.faces) and r_chosen.std() < 1.2 * r_otsu.std() + 1e-3
