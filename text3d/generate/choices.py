"""A run's command-line choices that are not config keys, kept in the run folder's ``cli.json`` so that
``--resume`` (and ``text3d export``) keep them unless told otherwise: the turntable video on or off, and the
run whose earlier stages ``--from`` continued. The seed, device, steps, stages and teacher are config keys
and live in ``config.yaml``.

This module imports nothing heavy: the command line checks ``--format`` against :data:`FORMATS` before
torch is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from text3d.errors import UserError
from text3d.runtime.atomic import atomic_write_text

CHOICES_NAME = "cli.json"
# `text3d export --format NAME` -> the mesh files written
FORMATS = {"obj": ("obj",), "glb": ("glb",), "ply": ("ply",), "both": ("obj", "glb"), "all": ("obj", "glb", "ply")}


@dataclass(frozen=True)
class RunChoices:
    video: bool = True  # a turntable video next to the meshes (--video / --no-video)
    from_run: Optional[str] = None  # --from: the run whose earlier stages this one continues (absolute path)

    def given(self, video: Optional[bool] = None) -> "RunChoices":
        """These choices with the ones given again on a command line (None: as before)."""
        return self if video is None else replace(self, video=bool(video))


def read_choices(run_dir: str | Path) -> RunChoices:
    """The choices stored in ``run_dir``; the defaults for a run folder written before they were stored."""
    path = Path(run_dir) / CHOICES_NAME
    if not path.is_file():
        return RunChoices()
    try:
        data = json.loads(path.read_text())
        choices = RunChoices(video=data.get("video", True), from_run=data.get("from_run"))
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); delete it to use the defaults (video on)") from None
    if not isinstance(choices.video, bool) or not isinstance(choices.from_run, (str, type(None))):
        raise UserError(f"{path} holds a bad value; delete it to use the defaults (video on)")
    return choices


def write_choices(run_dir: str | Path, choices: RunChoices) -> Path:
    """Write ``cli.json`` atomically."""
    return atomic_write_text(Path(run_dir) / CHOICES_NAME, json.dumps(asdict(choices), indent=2) + "\n")
