"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A tiny random teacher (diffusers StableDiffusionPipeline folder), built once per test session.

    Load it with ``text3d.teacher.load_teacher(tiny_teacher_dir, "cpu")``: 64x64 images, 16x16x4
    latents, 77x32 text embeddings. Treat the folder as read-only (copy it before corrupting it).
    """
    from text3d.teacher.tiny import build_tiny_teacher

    return build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher") / "teacher", seed=0)
