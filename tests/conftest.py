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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread: tiny models are dominated by per-op overhead, so one thread
    is as fast, and far faster when the other core is busy. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def teacher(tiny_teacher_dir):
    """The tiny test teacher loaded on the CPU (a fresh object per test)."""
    import torch

    from text3d.teacher import load_teacher

    return load_teacher(str(tiny_teacher_dir), torch.device("cpu"))
