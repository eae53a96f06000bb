"""Export of trained assets: marching cubes, UV atlas, baked albedo texture, .obj/.glb files, turntable videos.

Pipeline: ``extract_mesh`` (density grid -> closed mesh) -> ``unwrap_uv`` (xatlas charts) ->
``bake_texture`` (albedo per texel) -> OBJ+MTL+PNG and/or GLB, all written atomically by
``export_asset``. ``write_turntable`` turns rendered frames into an .mp4 (or .gif without ffmpeg).
"""

from text3d.export.asset import export_asset, export_textured_mesh
from text3d.export.bake import bake_texture
from text3d.export.config import ExportConfig, check_export_config
from text3d.export.marching import (auto_threshold, extract_mesh, extract_mesh_from_grid, extract_mesh_matching,
                                   sample_density_grid)
from text3d.export.turntable import write_turntable
from text3d.export.uv_atlas import unwrap_uv

__all__ = [
    "ExportConfig",
    "auto_threshold",
    "bake_texture",
    "check_export_config",
    "export_asset",
    "export_textured_mesh",
    "extract_mesh",
    "extract_mesh_from_grid",
    "extract_mesh_matching",
    "sample_density_grid",
    "unwrap_uv",
    "write_turntable",
]
