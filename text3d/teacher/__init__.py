"""The teacher layer: load a diffusers Stable-Diffusion-family model and expose what guidance needs.

  teacher.py    Teacher (noise prediction with CFG, VAE encode/decode, cached prompt embeddings),
                TeacherConfig, load_teacher, and the CFG / v / x0 conversion formulas
  loader.py     component-by-component loading from a folder or hub id, one-line TeacherErrors
  tiny.py       a tiny random teacher written as a real diffusers folder (tests, CPU smoke runs)
  sd_shapes.py  random teachers of SD 1.5 / 2.1 / 2.1-base's published shapes with CLIP's real BPE tokenizer
  memory.py     a teacher's size, resolution and prediction type read from its folder, and peak-memory estimates
  tokenizer.py  a CLIP byte-level BPE tokenizer built from a word list, without any download
"""

from text3d.teacher.teacher import (
    Teacher,
    TeacherConfig,
    apply_cfg,
    load_teacher,
    sample_to_eps,
    v_to_eps,
)

__all__ = ["Teacher", "TeacherConfig", "apply_cfg", "load_teacher", "sample_to_eps", "v_to_eps",
           "build_tiny_teacher", "build_clip_tokenizer"]


def __getattr__(name):  # the builders import diffusers/transformers; load them on first use only
    if name == "build_tiny_teacher":
        from text3d.teacher.tiny import build_tiny_teacher

        return build_tiny_teacher
    if name == "build_clip_tokenizer":
        from text3d.teacher.tokenizer import build_clip_tokenizer

        return build_clip_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
