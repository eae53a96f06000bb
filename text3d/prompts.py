"""View-dependent prompts: DreamFusion's suffixes appended according to each camera's view label."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from text3d.cameras import Cameras, CameraSamplerConfig
from text3d.errors import UserError

VIEW_SUFFIXES = {"front": ", front view", "side": ", side view", "back": ", back view", "overhead": ", overhead view"}
# the views an orbit around the object passes through; each one's Perp-Neg negatives are the other two
AZIMUTH_VIEWS = ("front", "side", "back")


@dataclass
class PromptConfig:
    view_dependent: bool = True
    negative: str = ""  # the unconditional branch of CFG; empty prompt by default


def validate_prompt(prompt: str) -> str:
    text = " ".join((prompt or "").split())
    if not text:
        raise UserError("the prompt is empty: give a text description, e.g. text3d generate \"a red cube\"")
    return text


def view_prompt(prompt: str, label: str) -> str:
    return prompt + VIEW_SUFFIXES[label]


def split_view_suffix(text: str) -> tuple[str, str | None]:
    """("a red car", "side") from "a red car, side view"; (text, None) when it ends with no view suffix."""
    for label, suffix in VIEW_SUFFIXES.items():
        if text.endswith(suffix):
            return text[: -len(suffix)], label
    return text, None


def other_view_prompts(text: str) -> list[str]:
    """The same prompt in the other azimuth views, Perp-Neg's negatives: for "a red car, front view",
    ["a red car, side view", "a red car, back view"]. Empty for a plain prompt or an overhead view."""
    base, label = split_view_suffix(text)
    if label not in AZIMUTH_VIEWS:
        return []
    return [view_prompt(base, other) for other in AZIMUTH_VIEWS if other != label]


def prompts_for_cameras(prompt: str, cameras: Cameras, cfg: PromptConfig,
                        cam_cfg: CameraSamplerConfig | None = None) -> list[str]:
    """One prompt per camera: the base prompt with the camera's view suffix (or the base prompt alone)."""
    if not cfg.view_dependent:
        return [prompt] * len(cameras)
    return [view_prompt(prompt, label) for label in cameras.view_labels(cam_cfg)]


def prompt_file_lines(path: Path) -> list[str]:
    """The lines of a prompts file (one-line UserError when it is missing, not a file or not UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text") from None


def read_prompts_file(path: Path) -> list[str]:
    """Non-empty lines of ``path`` (whitespace collapsed); lines starting with ``#`` are comments."""
    lines = prompt_file_lines(path)
    prompts = [validate_prompt(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts (one prompt per line)")
    return prompts
