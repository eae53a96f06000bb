"""Optional validation of exported .glb files with the Khronos glTF validator (npm `gltf-validator`).

The validator is a Node package, so it is used when present: ``node`` on the PATH and the package
in ``TEXT3D_GLTF_VALIDATOR`` (a node_modules folder), ``./node_modules`` or ``.tools/node_modules``
of the repository (``npm install --prefix .tools gltf-validator``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPT = REPO / "scripts" / "gltf_validate.mjs"


def validator_node_path() -> Path | None:
    """The node_modules folder holding gltf-validator, or None (also when node is missing)."""
    if shutil.which("node") is None or not SCRIPT.is_file():
        return None
    candidates = [os.environ.get("TEXT3D_GLTF_VALIDATOR"), REPO / "node_modules", REPO / ".tools" / "node_modules"]
    for folder in candidates:
        if folder and (Path(folder) / "gltf-validator" / "package.json").is_file():
            return Path(folder)
    return None


def validate_gltf(paths: Sequence[str | os.PathLike], timeout: float = 120) -> list[dict]:
    """One report per file: {"file", "errors", "warnings", "infos", "messages"}. Raises RuntimeError when
    the validator is not installed or fails to run."""
    node_path = validator_node_path()
    if node_path is None:
        raise RuntimeError("the glTF validator is not installed: npm install --prefix .tools gltf-validator")
    env = dict(os.environ, NODE_PATH=str(node_path))
    proc = subprocess.run(["node", str(SCRIPT), *map(str, paths)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(reports) != len(paths):
        raise RuntimeError(f"the glTF validator failed: {proc.stderr.strip()[:300]}")
    return reports
