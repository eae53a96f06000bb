"""Run folders: naming, the writability probe done before anything is created, and the file layout.

Layout of a run folder::

    config.yaml                 the full config snapshot (prompt, seed, run_name included)
    cli.json                    command-line choices that are not config keys (video, --from); --resume keeps them
    checkpoints/last.pt         the latest checkpoint (atomic); --resume continues from it
    previews/step_000200.png    preview grids during training
    preview.png                 the final preview grid
    <run_name>.obj/.mtl/_albedo.png, <run_name>.glb, <run_name>_turntable.mp4 (or .gif)
    run.json                    summary: steps, wall time, files
    train_log.jsonl, curves.png the per-step stats and their plot (text3d.report.curves)
    index.html, web/            the run page and model-viewer's script (text3d.report.page)
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
import tempfile
from pathlib import Path

from text3d.errors import UserError

CONFIG_NAME = "config.yaml"
CHECKPOINT = Path("checkpoints") / "last.pt"
SUMMARY_NAME = "run.json"


def slugify(text: str, max_len: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (slug[:max_len].rstrip("-") or "asset")


def new_run_name(prompt: str) -> str:
    """``<prompt-slug>-<UTC time>-<random>``: file names that never collide between runs."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{slugify(prompt)}-{stamp}-{secrets.token_hex(2)}"


def default_run_dir(prompt: str, root: str | Path = "runs") -> Path:
    return Path(root) / new_run_name(prompt)


def probe_writable(path: Path) -> None:
    """Raise UserError unless ``path`` can be created and written. Creates nothing that stays."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"output folder {path} exists and is not a folder")
        if any(path.iterdir()):
            raise UserError(f"output folder {path} is not empty; choose another --out, or --resume {path}")
        anchor = path
    else:
        anchor = path.parent
        while not anchor.exists():
            anchor = anchor.parent
        if not anchor.is_dir():
            raise UserError(f"cannot create output folder {path}: {anchor} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=anchor):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to output folder {path}: permission denied")


def create_run_dir(path: Path) -> Path:
    try:
        (path / CHECKPOINT.parent).mkdir(parents=True, exist_ok=True)
        (path / "previews").mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    return path


def require_run_dir(path: Path) -> Path:
    """A folder made by `text3d generate` (for --resume and `text3d export`)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"run folder {path} does not exist")
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path} is not a text3d run folder (no {CONFIG_NAME})")
    return path
