"""View-dependent prompts: DreamFusion's suffixes appended according to each camera's view label."""

from __future__ import annotations

from dataclasses import dataclass

from text3d.cameras import Cameras, CameraSamplerConfig
from text3d.errors import UserError

VIEW_SUFFIXES = {"front": ", front view", "side": ", side view", "back": ", back view", "overhead": ", overhead view"}


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


def prompts_for_cameras(prompt: str, cameras: Cameras, cfg: PromptConfig,
                        cam_cfg: CameraSamplerConfig | None = None) -> list[str]:
    """One prompt per camera: the base prompt with the camera's view suffix (or the base prompt alone)."""
    if not cfg.view_dependent:
        return [prompt] * len(cameras)
    return [view_prompt(prompt, label) for label in cameras.view_labels(cam_cfg)]
