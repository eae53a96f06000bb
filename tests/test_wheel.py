"""The wheel works outside a checkout: it holds the configs, the embedded teacher and judge and the eval prompt
sets, and `python -m text3d generate` runs from it in a fresh venv, from a folder outside the repository.

The wheel is built from a copy of the sources (no build/ or *.egg-info in the checkout). The fresh venv reuses
this environment's installed dependencies through a .pth file of plain path lines: .pth files inside those
folders are not processed, so an editable install of text3d there (its finder .pth) cannot shadow the wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs the source checkout")


def _run(cmd, timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *(p.name for p in REPO.glob("LICEN[CS]E*"))):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "text3d", src / "text3d", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp / "dist", src], timeout=300)
    (wheel,) = (tmp / "dist").glob("text3d-*.whl")
    return wheel


def _venv_with_wheel(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """A fresh venv with the wheel installed, then given this environment's dependency folders."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # installed before the dependency folders are visible: pip sees no other text3d to replace
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         timeout=300)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        timeout=60).stdout.strip())
    deps = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    deps = [d for d in dict.fromkeys(deps) if Path(d).is_dir() and Path(d).resolve() != purelib.resolve()]
    (purelib / "_text3d_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return python, purelib


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_installs_and_generates_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)

    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("text3d/configs/default.yaml", "text3d/assets/teacher/model_index.json",
                     "text3d/assets/teacher/unet/config.json",
                     "text3d/assets/teacher/unet/diffusion_pytorch_model.safetensors",
                     "text3d/assets/judge/config.json", "text3d/assets/judge/model.safetensors",
                     "text3d/assets/eval/prompts_216.txt", "text3d/py.typed", "text3d/__main__.py"):
        assert required in names, required
    shipped = {f"text3d/{part}/{name}" for part in ("configs", "assets") for name in _files(REPO / "text3d" / part)}
    assert not shipped - names, f"missing from the wheel: {sorted(shipped - names)}"
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)

    python, purelib = _venv_with_wheel(tmp_path, wheel)
    installed = purelib / "text3d"
    assert (python.parent / ("text3d.exe" if os.name == "nt" else "text3d")).is_file()  # the console script
    work = tmp_path / "elsewhere"  # not the checkout: nothing importable from the working directory
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "TEXT3D_DEFAULT_TEACHER", "TEXT3D_DEBUG", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    check = (
        "import sys, text3d\n"
        "from pathlib import Path\n"
        "from text3d.runtime.resources import ASSETS_DIR, CONFIG_DIR\n"
        "from text3d.teacher.loader import default_teacher\n"
        "here = Path(sys.argv[1]).resolve()\n"
        "for p in (text3d.__file__, CONFIG_DIR, ASSETS_DIR, default_teacher()):\n"
        "    assert Path(p).resolve().is_relative_to(here), (p, here)\n"
        "assert not any('editable' in m for m in sys.modules), [m for m in sys.modules if 'editable' in m]\n"
        "assert not any('editable' in type(f).__module__ for f in sys.meta_path), sys.meta_path\n"
        "print('ok')\n")
    assert _run([python, "-c", check, installed], timeout=120, cwd=work, env=env).stdout.strip() == "ok"

    before = _files(installed)
    out = tmp_path / "out"
    small = ["export.grid_resolution=64", "export.texture_size=128"]  # a third of the default export's time
    proc = _run([python, "-m", "text3d", "generate", "a red cube", *small, "--steps", "3", "--no-video", "--quiet",
                 "--out", out], timeout=600, cwd=work, env=env)
    glbs = list(out.glob("*.glb"))
    assert len(glbs) == 1 and glbs[0].stat().st_size > 1000, (proc.stdout, sorted(p.name for p in out.iterdir()))
    assert glbs[0].read_bytes()[:4] == b"glTF"
    assert _files(installed) == before  # the run wrote nothing into the installed package
    assert not (work / "runs").exists() and not any(work.iterdir())
