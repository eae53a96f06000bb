"""Registries by name from Python entry points: text3d's own methods are registered like a plug-in's, a
guidance added from outside the package runs end to end, and unknown or broken names are one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.helpers import FAST, REPO, run_cli
from text3d.errors import ConfigError
from text3d.runtime.registry import Entry, PluginError, Registry

BUILT_IN = {
    "text3d.guidance": {"sds", "vsd"},
    "text3d.stages": {"nerf", "geometry", "texture"},
    "text3d.distill2d": {"swiftbrush", "dmd", "dmd2", "kd", "pd", "guided"},
}


def _dist_info(site: Path, name: str, groups: dict[str, dict[str, str]]) -> None:
    """A minimal installed distribution in ``site``: METADATA and entry_points.txt, as pip would leave it."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n" for group, points in groups.items()))


def _one_line_error(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("group", sorted(BUILT_IN))
def test_built_in_methods_are_entry_points(group):
    assert BUILT_IN[group] <= {p.name for p in entry_points(group=group)}


def test_built_in_entries_load_and_stages_keep_their_order():
    from text3d.distill2d.config import DISTILL2D_REGISTRY
    from text3d.generate.config import GUIDANCE_REGISTRY, STAGE_REGISTRY, stage_checkpoint, stage_order

    assert stage_order()[:3] == ("nerf", "geometry", "texture")
    assert str(stage_checkpoint("nerf")) == "checkpoints/last.pt"
    assert str(stage_checkpoint("geometry")) == "checkpoints/geometry.pt"
    assert GUIDANCE_REGISTRY.get("vsd").preset_path.name == "vsd.yaml" and GUIDANCE_REGISTRY.get("sds").preset is None
    assert dict(STAGE_REGISTRY.get("geometry").regularisers) == {"laplacian": "lambda_laplacian",
                                                                 "normal_consistency": "lambda_normal_consistency"}
    for name in BUILT_IN["text3d.distill2d"]:
        assert DISTILL2D_REGISTRY.get(name).preset_path.name == f"{name}.yaml"


def test_registry_import_loads_no_plugin_and_no_torch():
    """Importing the registry imports neither torch nor diffusers; importing the generate config loads no plug-in
    (entries are loaded on first lookup)."""
    checks = ["import sys, text3d.runtime.registry; assert not {'torch', 'diffusers'} & set(sys.modules)",
              "import sys, text3d.generate.config; assert 'text3d.generate.builtins' not in sys.modules"]
    for code in checks:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr


def test_unknown_names_are_one_line_errors_listing_the_known_ones(tmp_path):
    line = _one_line_error(run_cli("generate", "a red cube", "--guidance", "magic", "--out", str(tmp_path / "run")))
    assert "guidance must be one of" in line and "'magic'" in line and "sds" in line and "vsd" in line
    assert not (tmp_path / "run").exists()
    line = _one_line_error(run_cli("distill2d", "--method", "magic", "--out", str(tmp_path / "d")))
    assert "--method must be one of" in line and all(m in line for m in BUILT_IN["text3d.distill2d"])


def test_registry_lookups_and_plugin_failures(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "reg_good.py").write_text(textwrap.dedent("""
        from text3d.runtime.registry import Entry
        thing = Entry(build=lambda: "built")
        def make():
            return Entry(build=lambda: "made")
    """))
    (site / "reg_broken.py").write_text("import a_module_that_does_not_exist\n")
    (site / "reg_wrong.py").write_text("thing = 42\n")
    _dist_info(site, "reg-plugins", {"text3d.test_registry": {
        "good": "reg_good:thing", "made": "reg_good:make", "broken": "reg_broken:thing", "wrong": "reg_wrong:thing"}})
    monkeypatch.syspath_prepend(str(site))
    registry = Registry("text3d.test_registry", "thing", Entry)
    assert registry.names() == ("broken", "good", "made", "wrong")
    assert "reg_good" not in sys.modules  # names come from metadata alone
    good = registry.get("good")
    assert good.name == "good" and good.build() == "built" and registry.get("made").build() == "made"
    with pytest.raises(ConfigError) as info:
        registry.get("nope")
    assert str(info.value) == "thing must be one of broken, good, made, wrong, got 'nope'"
    with pytest.raises(PluginError) as info:
        registry.get("broken")
    message = str(info.value)
    assert "'broken'" in message and "reg_broken:thing" in message and "ModuleNotFoundError" in message
    assert "\n" not in message
    with pytest.raises(PluginError, match="gave a int, not a Entry"):
        registry.get("wrong")
    registry.register("local", Entry(build=lambda: "local"))
    assert "local" in registry and registry.get("local").name == "local"


PLUGIN = '''
"""A guidance from outside text3d: SDS with a config of its own (one extra field) and a preset."""

import os
from dataclasses import dataclass
from pathlib import Path

from text3d.generate.config import GUIDANCE_REGISTRY, GuidanceMethod

SDS = GUIDANCE_REGISTRY.get("sds")


@dataclass
class LoudSDSConfig(SDS.config):
    loudness: float = 1.0


def build(teacher, cfg, negative_prompt=""):
    Path(os.environ["LOUD_SDS_MARKER"]).write_text(f"loudness={cfg.loudness} class={type(cfg).__name__}")
    return SDS.build(teacher, cfg, negative_prompt=negative_prompt)


loud_sds = GuidanceMethod(config=LoudSDSConfig, build=build, validate=SDS.validate,
                          preset=Path(__file__).with_name("loud_sds.yaml"))
'''


def test_a_guidance_plugin_from_outside_the_package_runs_end_to_end(tiny_teacher_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "loud_sds_plugin.py").write_text(PLUGIN)
    (site / "loud_sds.yaml").write_text("guidance: loud_sds\nloud_sds:\n  loudness: 3.0\n  space: image\n"
                                        "  guidance_scale: 10\n")
    _dist_info(site, "loud-sds-plugin", {"text3d.guidance": {"loud_sds": "loud_sds_plugin:loud_sds"}})
    marker, out = tmp_path / "marker.txt", tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "LOUD_SDS_MARKER": str(marker)}
    result = run_cli("generate", "a red cube", "--guidance", "loud_sds", "--steps", "2", "--no-video", "-q",
                     "--teacher", str(tiny_teacher_dir), "--out", str(out), *FAST, env_update=env)
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.glb"))) == 1
    config = (out / "config.yaml").read_text()
    assert "guidance: loud_sds" in config and "\nloud_sds:\n" in config and "loudness: 3.0" in config
    assert marker.read_text() == "loudness=3.0 class=LoudSDSConfig"
    # its key is an ordinary config key: overridable, validated like SDS's
    bad = run_cli("generate", "a red cube", "--guidance", "loud_sds", "--teacher", str(tiny_teacher_dir),
                  "--out", str(tmp_path / "bad"), "loud_sds.t_min=2", env_update=env)
    assert "loud_sds.t_min" in _one_line_error(bad) and not (tmp_path / "bad").exists()
    # without the plug-in on the path, the name is unknown and the built-in ones are listed
    line = _one_line_error(run_cli("generate", "a red cube", "--guidance", "loud_sds", "--out", str(tmp_path / "x")))
    assert "guidance must be one of" in line and "sds, vsd" in line and "got 'loud_sds'" in line


def test_renderers_implement_the_protocol():
    import torch

    from text3d.renderers import NeRFConfig, NeRFRenderer, Renderer
    from text3d.renderers.mesh_stages import TextureStageModel

    nerf = NeRFRenderer(NeRFConfig(n_levels=2, log2_hashmap_size=8, max_resolution=32, backend="torch"))
    verts = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    mesh = TextureStageModel(verts, torch.tensor([[0, 1, 2]]), nerf.field, nerf.background)
    for renderer in (nerf, mesh):
        assert isinstance(renderer, Renderer)
    assert mesh.surface().faces.shape == (1, 3) and mesh.colour_field() is mesh.field
