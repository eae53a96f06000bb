"""Turntable videos: RGB frames -> H.264 .mp4 through imageio-ffmpeg, or an animated .gif without ffmpeg."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from text3d.runtime.atomic import atomic_path

log = logging.getLogger(__name__)

MACRO_BLOCK = 16  # H.264 works in 16x16 blocks; yuv420p needs even sizes at the very least


def _ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (raises if there is none)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _as_rgb_frames(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(frames) == 0:
        raise ValueError("write_turntable needs at least one frame")
    out = []
    for f in frames:
        f = np.asarray(f)
        if f.dtype != np.uint8:
            f = np.clip(np.rint(f.astype(np.float64) * (255.0 if f.dtype.kind == "f" else 1.0)), 0, 255)
            f = f.astype(np.uint8)
        if f.ndim == 2:
            f = np.repeat(f[:, :, None], 3, axis=2)
        if f.ndim != 3 or f.shape[2] not in (3, 4):
            raise ValueError(f"frames must be [H, W, 3] images, got shape {f.shape}")
        out.append(np.ascontiguousarray(f[:, :, :3]))
    if len({f.shape for f in out}) != 1:
        raise ValueError("all turntable frames must have the same size")
    return out


def pad_to_multiple(frame: np.ndarray, multiple: int = MACRO_BLOCK) -> np.ndarray:
    """Pad H and W up to a multiple of ``multiple``, centred, repeating the border pixels (no resampling)."""
    h, w = frame.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return frame
    return np.pad(frame, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="edge")


def _stem_with(path_stem: Path, suffix: str) -> Path:
    # append rather than with_suffix: run names may contain dots ("a_cat_v1.5-run3")
    if path_stem.suffix.lower() in (".mp4", ".gif"):
        path_stem = path_stem.with_suffix("")
    return path_stem.with_name(path_stem.name + suffix)


def _write_mp4(frames: list[np.ndarray], path: Path, fps: int) -> None:
    import imageio_ffmpeg

    padded = [pad_to_multiple(f) for f in frames]
    h, w = padded[0].shape[:2]
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=float(fps), codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=8, macro_block_size=1, ffmpeg_log_level="error", output_params=["-movflags", "+faststart"])
        writer.send(None)  # start the ffmpeg process
        try:
            for f in padded:
                writer.send(f)
        finally:
            writer.close()
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise RuntimeError("ffmpeg wrote no video")


def _write_gif(frames: list[np.ndarray], path: Path, fps: int) -> None:
    images = [Image.fromarray(f, mode="RGB") for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=max(20, int(round(1000.0 / fps))), disposal=1)


def write_turntable(frames: Sequence[np.ndarray], path_stem: str | os.PathLike, fps: int,
                    prefer_mp4: bool = True) -> Path:
    """Write frames (uint8 [H, W, 3]) as ``{path_stem}.mp4`` (H.264, yuv420p), atomically; return the path.

    Frames are padded (border repeated, centred) to a multiple of 16 pixels. When ffmpeg is missing
    or fails, or ``prefer_mp4`` is False, writes ``{path_stem}.gif`` instead.
    """
    rgb = _as_rgb_frames(frames)
    path_stem = Path(path_stem)
    fps = max(1, int(fps))
    if prefer_mp4:
        mp4 = _stem_with(path_stem, ".mp4")
        try:
            _ffmpeg_exe()
            _write_mp4(rgb, mp4, fps)
            return mp4
        except Exception as exc:  # no ffmpeg binary, codec missing, broken pipe...
            log.warning("turntable: mp4 via ffmpeg failed (%s); writing a gif instead", str(exc).splitlines()[0]
                        if str(exc) else type(exc).__name__)
    gif = _stem_with(path_stem, ".gif")
    _write_gif(rgb, gif, fps)
    return gif
