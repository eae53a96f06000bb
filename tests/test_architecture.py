"""The package's layout holds: layer contracts (import-linter), no import cycles, package data present."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_layer_contracts_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    r = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_import_cycles():
    """No module of text3d reaches itself through its imports (lazy imports inside functions included)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("text3d")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported == module or not imported.startswith("text3d"):
                continue
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} -> {imported} -> ... -> {module}")
    assert not cycles, "\n".join(cycles[:20])


def test_package_data_is_inside_the_package():
    from text3d.runtime.resources import CONFIG_DIR, package_path

    assert (CONFIG_DIR / "default.yaml").is_file()
    assert (package_path("assets", "teacher") / "model_index.json").is_file()
    assert (package_path("assets", "judge") / "model.safetensors").is_file()
    assert (package_path("assets", "eval") / "prompts_216.txt").is_file()
    assert package_path().resolve().is_relative_to(Path(__import__("text3d").__file__).resolve().parent)
