"""Files shipped inside the package (configs, the embedded teacher and judge, eval prompt sets), found with
:mod:`importlib.resources` so that an editable install, ``pip install .`` and a wheel all see the same tree."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def package_path(*parts: str) -> Path:
    """The path of ``text3d/<parts...>`` on disk (the package is always installed unzipped)."""
    return Path(str(resources.files("text3d").joinpath(*parts)))


CONFIG_DIR = package_path("configs")
ASSETS_DIR = package_path("assets")
