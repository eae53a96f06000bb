"""Atomic writers for meshes: OBJ + MTL + PNG and binary glTF (.glb) with a PBR material (textured), and
PLY with per-vertex colours.

trimesh builds the file contents; every file is written through :mod:`text3d.runtime.atomic` and the
result is read back with trimesh before it is renamed into place. Coordinates are written as they
are: text3d's world frame (+Y up, front +Z) is glTF's, so no axis swap.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import trimesh
from PIL import Image

from text3d.runtime.atomic import atomic_path, atomic_write_bytes

ROUGHNESS = 0.9


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG, atomically."""
    return atomic_write_bytes(path, encode_png(image))


def _textured_mesh(vertices, faces, uvs, normals, material) -> trimesh.Trimesh:
    # process=False: keep the seam vertices (same position, different UV) exactly as unwrapped
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64),
                           process=False)
    mesh.visual = trimesh.visual.TextureVisuals(uv=np.asarray(uvs, dtype=np.float64), material=material)
    if normals is not None:
        mesh.vertex_normals = np.asarray(normals, dtype=np.float64)
    return mesh


def _check_reload(path: Path, n_faces: int, texture_shape: tuple[int, int], kind: str) -> None:
    """Reload a written file with trimesh; raise RuntimeError unless it has UVs and the texture image."""
    loaded = trimesh.load(path, force="mesh")
    uv = getattr(loaded.visual, "uv", None)
    material = getattr(loaded.visual, "material", None)
    image = None
    if material is not None:
        image = getattr(material, "baseColorTexture", None)
        if image is None:
            image = getattr(material, "image", None)
    problems = []
    if uv is None or len(uv) != len(loaded.vertices):
        problems.append("no per-vertex UVs")
    if image is None:
        problems.append("no texture image")
    elif tuple(image.size[::-1]) != tuple(texture_shape):
        problems.append(f"texture is {image.size[1]}x{image.size[0]}, expected {texture_shape[0]}x{texture_shape[1]}")
    if len(loaded.faces) != n_faces:
        problems.append(f"{len(loaded.faces)} faces read back, {n_faces} written")
    if problems:
        raise RuntimeError(f"{kind} export check failed for {path.name}: " + "; ".join(problems))


def _write_checked(path: str | os.PathLike, data: bytes, check: Callable[[Path], None] | None) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, run ``check(tmp)``, then rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
    return path


def write_obj(out_dir: str | os.PathLike, name: str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
              texture: np.ndarray, normals: np.ndarray | None = None, verify: bool = True) -> dict[str, Path]:
    """Write ``{name}.obj``, ``{name}.mtl`` and ``{name}_albedo.png`` into ``out_dir``, each atomically.

    The OBJ references the MTL (``mtllib {name}.mtl``), the MTL the PNG (``map_Kd {name}_albedo.png``),
    both by relative name. Written in the order PNG, MTL, OBJ, so whenever the OBJ exists under its
    final name, what it references does too.
    """
    out_dir = Path(out_dir)
    material_name = f"{name}_albedo"
    mtl_name, png_name = f"{name}.mtl", f"{material_name}.png"
    material = trimesh.visual.material.SimpleMaterial(
        image=Image.fromarray(np.ascontiguousarray(texture, dtype=np.uint8), mode="RGB"), name=material_name,
        ambient=(255, 255, 255, 255), diffuse=(255, 255, 255, 255), specular=(0, 0, 0, 255), glossiness=1.0)
    mesh = _textured_mesh(vertices, faces, uvs, normals, material)
    text, files = trimesh.exchange.obj.export_obj(
        mesh, include_normals=normals is not None, include_color=False, include_texture=True,
        return_texture=True, write_texture=False, mtl_name=mtl_name, header="text3d")
    # trimesh names the image after the material: make sure it is exactly our pair of files
    if set(files) != {mtl_name, png_name}:
        raise RuntimeError(f"unexpected OBJ side files from trimesh: {sorted(files)}")
    mtl_text = files[mtl_name].decode("utf-8")
    if f"map_Kd {png_name}" not in mtl_text or f"mtllib {mtl_name}" not in text:
        raise RuntimeError("OBJ/MTL do not reference their texture/material by our file names")
    mtl_text = mtl_text.rstrip("\n") + "\nd 1.0\nillum 1\n"  # opaque, diffuse-only

    paths = {"texture": out_dir / png_name, "mtl": out_dir / mtl_name, "obj": out_dir / f"{name}.obj"}
    write_png(paths["texture"], texture)  # our own encoder: identical pixels, no re-encoding by trimesh
    atomic_write_bytes(paths["mtl"], mtl_text.encode("utf-8"))
    with atomic_path(paths["obj"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
        if verify:
            # the temporary OBJ sits beside the final MTL/PNG, so the loader resolves them as a viewer would
            _check_reload(tmp, len(faces), texture.shape[:2], "OBJ")
    return paths


def glb_bytes(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, texture: np.ndarray,
              normals: np.ndarray | None = None, name: str = "asset") -> bytes:
    """A binary glTF of one textured mesh: PBR material with an embedded PNG baseColorTexture,
    metallic 0, roughness 0.9."""
    material = trimesh.visual.material.PBRMaterial(
        name=f"{name}_material",
        baseColorTexture=Image.fromarray(np.ascontiguousarray(texture, dtype=np.uint8), mode="RGB"),
        baseColorFactor=[255, 255, 255, 255], metallicFactor=0.0, roughnessFactor=ROUGHNESS)
    mesh = _textured_mesh(vertices, faces, uvs, normals, material)
    mesh.metadata["name"] = name
    return mesh.export(file_type="glb", include_normals=normals is not None)


def write_glb(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
              texture: np.ndarray, normals: np.ndarray | None = None, name: str = "asset",
              verify: bool = True) -> Path:
    """Write :func:`glb_bytes` to ``path`` atomically (checked by reloading the temporary file first)."""
    data = glb_bytes(vertices, faces, uvs, texture, normals, name)
    return _write_checked(path, data, (lambda tmp: _check_reload(tmp, len(faces), texture.shape[:2], "GLB"))
                          if verify else None)


def write_ply(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray,
              verify: bool = True) -> Path:
    """Write a binary PLY with per-vertex RGB colours (``colors`` uint8 [V, 3]) to ``path`` atomically,
    checked by reloading the temporary file first."""
    colors = np.asarray(colors, dtype=np.uint8)
    if colors.shape != (len(vertices), 3):
        raise ValueError(f"colors must be [{len(vertices)}, 3], got {colors.shape}")
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64),
                           vertex_colors=np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], 1),
                           process=False)

    def check(tmp: Path) -> None:
        loaded = trimesh.load(tmp, force="mesh", process=False)
        got = np.asarray(loaded.visual.vertex_colors)[:, :3]
        if len(loaded.faces) != len(faces) or got.shape != colors.shape or not np.array_equal(got, colors):
            raise RuntimeError(f"PLY export check failed for {Path(path).name}: faces or vertex colours differ on reload")

    return _write_checked(path, mesh.export(file_type="ply", encoding="binary"), check if verify else None)
