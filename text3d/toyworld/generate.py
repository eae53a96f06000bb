"""Render a toyworld dataset: shards of captioned images of random objects, colours and cameras.

Reproducibility: shard ``i`` of a dataset depends only on ``(seed, i, shard_size, resolution,
p_plain_caption)`` (its random numbers come from a ``torch.Generator`` seeded from ``(seed, i)``), so
shards can be rendered in any order or in parallel, and a killed render resumes by skipping the shards
already on disk (shards are written atomically). A larger ``n`` with the same settings reuses every full
shard of a smaller one.

Balance: example ``k`` of the dataset shows object/colour pair ``perm_c[k mod C]`` with ``C`` the number of
pairs and ``perm_c`` a random permutation drawn for the block ``c = k // C``: each block of ``C``
consecutive examples holds every pair exactly once. Cameras come from
``sample_cameras(CameraSamplerConfig())``, the distribution ``text3d generate`` trains with (``max_elevation``
raises its top, 45 degrees, to show the objects from above: cameras at 60 degrees and up get the "overhead view"
suffix, the one view label the default range never reaches; ``min_radius`` lowers the bottom of the distance range,
2.6, to show them larger, their small features (a car's lights, a snowman's face) over more pixels); the light is the
camera direction jittered by up to ``LIGHT_JITTER_DEG`` (as in training) and the ambient term is uniform in
``AMBIENT_RANGE``. A caption is ``caption(object, colour)`` plus the camera's view suffix, or with
probability ``p_plain_caption`` the plain caption.

Besides the dataset format's files (:mod:`text3d.toyworld.dataset`), the folder holds ``render_params.json``,
the settings its shards were rendered with, so that a resume with other settings is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from text3d.cameras import VIEW_LABELS, CameraSamplerConfig, jittered_light_dirs, sample_cameras
from text3d.errors import UserError
from text3d.prompts import view_prompt
from text3d.toyworld.catalog import COLOURS, FRONT_BACK_OBJECTS, OBJECTS, caption
from text3d.toyworld.dataset import META_NAME, read_meta, shard_name, write_meta, write_shard
from text3d.toyworld.render import render_objects, to_uint8
from text3d.runtime.atomic import atomic_write_text

LIGHT_JITTER_DEG = 45.0  # as text3d's TrainConfig.light_jitter_deg
AMBIENT_RANGE = (0.3, 0.7)  # training shades with ambient 0.3 (lambertian) or renders plain albedo
RENDER_BATCH = 256  # images per render_objects call
PARAMS_NAME = "render_params.json"  # the settings of a render in progress, checked on resume
_SHARD_STREAM, _BLOCK_STREAM = 0, 1


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=(stream, int(index))).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def pairs() -> list[tuple[str, str]]:
    """Every (object, colour) pair, in catalog order."""
    return [(o, c) for o in OBJECTS for c in COLOURS]


def pair_indices(seed: int, start: int, stop: int) -> torch.Tensor:
    """Pair index (into :func:`pairs`) of dataset examples ``start .. stop-1`` (see the module docstring)."""
    n_pairs = len(OBJECTS) * len(COLOURS)
    out = []
    for block in range(start // n_pairs, (stop - 1) // n_pairs + 1):
        perm = torch.randperm(n_pairs, generator=_generator(seed, _BLOCK_STREAM, block))
        lo, hi = max(start, block * n_pairs), min(stop, (block + 1) * n_pairs)
        out.append(perm[lo - block * n_pairs: hi - block * n_pairs])
    return torch.cat(out)


def camera_sampler(max_elevation: float | None = None, min_radius: float | None = None) -> CameraSamplerConfig:
    """The training cameras' ranges, with the elevation's top at ``max_elevation`` and the distance's bottom at
    ``min_radius`` (None: the default)."""
    cfg = CameraSamplerConfig()
    if max_elevation is not None:
        cfg.elevation = (cfg.elevation[0], float(max_elevation))
    if min_radius is not None:
        cfg.radius = (float(min_radius), cfg.radius[1])
    return cfg


def render_shard(seed: int, index: int, shard_size: int, size: int, resolution: int = 64,
                 p_plain_caption: float = 0.3,
                 on_batch: Callable[[int], None] | None = None,
                 cameras: CameraSamplerConfig | None = None) -> dict[str, np.ndarray]:
    """The arrays of shard ``index`` (``size`` examples, ``size <= shard_size``) in the dataset format, its cameras
    drawn from ``cameras`` (None: :func:`camera_sampler`'s default ranges)."""
    g = _generator(seed, _SHARD_STREAM, index)
    start = index * shard_size
    all_pairs = pairs()
    chosen = [all_pairs[int(k)] for k in pair_indices(seed, start, start + size)]
    objects, colours = [o for o, _ in chosen], [c for _, c in chosen]
    cam_cfg = cameras if cameras is not None else camera_sampler()
    cams = sample_cameras(cam_cfg, size, generator=g)
    labels = cams.view_labels(cam_cfg)
    plain = (torch.rand(size, generator=g) < p_plain_caption).tolist()
    lo, hi = AMBIENT_RANGE
    ambient = lo + (hi - lo) * torch.rand(size, generator=g)
    light_seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):  # jittered_light_dirs draws from the global RNG
        torch.manual_seed(light_seed)
        light = jittered_light_dirs(cams, LIGHT_JITTER_DEG)

    images = np.zeros((size, resolution, resolution, 3), dtype=np.uint8)
    for b0 in range(0, size, RENDER_BATCH):
        sl = slice(b0, min(size, b0 + RENDER_BATCH))
        out = render_objects(objects[sl], colours[sl], cams[sl], resolution, light_dirs=light[sl], ambient=ambient[sl])
        images[sl] = to_uint8(out["rgb"]).numpy()
        if on_batch is not None:
            on_batch(sl.stop - sl.start)
    captions = [caption(o, c) if p else view_prompt(caption(o, c), label)
                for o, c, p, label in zip(objects, colours, plain, labels)]
    object_ids, colour_ids = list(OBJECTS), list(COLOURS)
    return {
        "images": images,
        "captions": np.array(captions, dtype=str),
        "object": np.array([object_ids.index(o) for o in objects], dtype=np.int16),
        "colour": np.array([colour_ids.index(c) for c in colours], dtype=np.int16),
        "view": np.array([VIEW_LABELS.index(label) for label in labels], dtype=np.int8),
        "elevation": cams.elevation.numpy().astype(np.float32),
        "azimuth": cams.azimuth.numpy().astype(np.float32),
        "radius": cams.radius.numpy().astype(np.float32),
        "fovy": cams.fovy.numpy().astype(np.float32),
    }


def shard_sizes(n: int, shard_size: int) -> list[int]:
    return [min(shard_size, n - start) for start in range(0, n, shard_size)]


def shard_complete(path: Path, size: int, resolution: int) -> bool:
    """Whether ``path`` holds a readable shard of ``size`` images at ``resolution``."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as shard:
            return len(shard["captions"]) == size and tuple(shard["images"].shape[1:]) == (resolution, resolution, 3)
    except Exception:  # noqa: BLE001 - anything unreadable is re-rendered
        return False


def _params(seed: int, resolution: int, shard_size: int, p_plain_caption: float,
            max_elevation: float | None = None, min_radius: float | None = None) -> dict:
    return {"seed": seed, "resolution": resolution, "shard_size": shard_size, "p_plain_caption": p_plain_caption,
            "objects": list(OBJECTS), "colours": list(COLOURS), "light_jitter_deg": LIGHT_JITTER_DEG,
            "ambient_range": list(AMBIENT_RANGE),
            **({} if max_elevation is None else {"max_elevation": float(max_elevation)}),
            **({} if min_radius is None else {"min_radius": float(min_radius)})}


def _check_args(n, seed, resolution, shard_size, p_plain_caption, workers, max_elevation=None, min_radius=None) -> None:
    low = CameraSamplerConfig().elevation[0]
    if max_elevation is not None and not low < max_elevation < 90.0:
        raise UserError(f"the top elevation must be in ({low:g}, 90) degrees, got {max_elevation:g}")
    far = CameraSamplerConfig().radius[1]
    # nearer than 1.8 the largest objects (bounding radius 0.6) leave the frame at the narrowest field of view, 40
    # degrees: 0.6 / sin(20 degrees) = 1.75
    if min_radius is not None and not 1.8 <= min_radius < far:
        raise UserError(f"the nearest camera distance must be in [1.8, {far:g}), got {min_radius:g}")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"the number of images must be >= 1, got {n}")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"the seed must be a non-negative integer, got {seed}")
    if not 8 <= resolution <= 1024:
        raise UserError(f"the resolution must be in [8, 1024], got {resolution}")
    if shard_size < 1:
        raise UserError(f"the shard size must be >= 1, got {shard_size}")
    if not 0.0 <= p_plain_caption <= 1.0:
        raise UserError(f"p_plain_caption must be in [0, 1], got {p_plain_caption}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")


def render_dataset(out_dir: str | Path, n: int, seed: int = 0, resolution: int = 64, shard_size: int = 2000,
                   p_plain_caption: float = 0.3, progress: bool = True, workers: int = 1,
                   max_elevation: float | None = None, min_radius: float | None = None) -> Path:
    """Render ``n`` images into ``out_dir`` (shards, then ``meta.json``) and return the folder.

    Shards already complete in ``out_dir`` (from a killed or smaller render with the same settings) are kept.
    ``workers > 1`` renders shards in that many processes (one torch thread each)."""
    _check_args(n, seed, resolution, shard_size, p_plain_caption, workers, max_elevation, min_radius)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    params = _params(seed, resolution, shard_size, p_plain_caption, max_elevation, min_radius)
    cameras = camera_sampler(max_elevation, min_radius)
    params_path = out / PARAMS_NAME
    if params_path.is_file():
        try:
            old = json.loads(params_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and old != params:
            diff = ", ".join(k for k in params if old.get(k) != params[k])
            raise UserError(f"{out} holds a toyworld render with other settings ({diff}); "
                            "use another --out folder or the same settings")
    elif any(out.glob("shard_*.npz")) or (out / META_NAME).exists():
        raise UserError(f"{out} holds shards of an unknown render; use another --out folder")
    atomic_write_text(params_path, json.dumps(params, indent=2) + "\n")

    sizes = shard_sizes(n, shard_size)
    names = [shard_name(i) for i in range(len(sizes))]
    meta = {"seed": seed, "n": n, "resolution": resolution, "objects": list(OBJECTS), "colours": list(COLOURS),
            "view_labels": list(VIEW_LABELS), "shards": names, "shard_size": shard_size,
            "p_plain_caption": p_plain_caption, "front_back_objects": list(FRONT_BACK_OBJECTS),
            "light_jitter_deg": LIGHT_JITTER_DEG, "ambient_range": list(AMBIENT_RANGE),
            **({} if max_elevation is None else {"elevation": list(cameras.elevation)}),
            **({} if min_radius is None else {"radius": list(cameras.radius)})}
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            current = read_meta(out)
        except UserError:
            current = None
        if current is not None and all(current.get(k) == v for k, v in meta.items()) and all(
                (out / name).is_file() for name in names):
            return out
        meta_path.unlink()  # a different n: the old meta would describe the wrong shards while we render

    todo = [i for i, size in enumerate(sizes) if not shard_complete(out / names[i], size, resolution)]
    done_images = n - sum(sizes[i] for i in todo)
    from text3d.runtime.progress import LoopProgress

    rendered = 0
    with LoopProgress(total=n, start=done_images, description="rendering toyworld", enabled=progress) as bar:
        def advance(k: int) -> None:
            nonlocal rendered
            rendered += k
            bar.update(done_images + rendered, {})

        if workers == 1 or len(todo) <= 1:
            for i in todo:
                arrays = render_shard(seed, i, shard_size, sizes[i], resolution, p_plain_caption, on_batch=advance,
                                      cameras=cameras)
                write_shard(out / names[i], arrays)
        else:
            _render_parallel(out, todo, sizes, names, seed, shard_size, resolution, p_plain_caption, workers, advance,
                             cameras)
    write_meta(out, meta)
    return out


# ------------------------------------------------------------------------------------------------------ workers
_queue = None


def _worker_init(queue) -> None:
    global _queue
    _queue = queue
    torch.set_num_threads(1)


def _worker_render(out: str, index: int, shard_size: int, size: int, seed: int, resolution: int,
                   p_plain_caption: float, name: str, cameras: CameraSamplerConfig | None = None) -> int:
    arrays = render_shard(seed, index, shard_size, size, resolution, p_plain_caption,
                          on_batch=lambda k: _queue.put(k), cameras=cameras)
    write_shard(Path(out) / name, arrays)
    return index


def _render_parallel(out, todo, sizes, names, seed, shard_size, resolution, p_plain_caption, workers, advance,
                     cameras=None):
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                                initargs=(q,)) as pool:
        futures = [pool.submit(_worker_render, str(out), i, shard_size, sizes[i], seed, resolution, p_plain_caption,
                               names[i], cameras) for i in todo]
        pending = set(futures)
        while pending:
            finished, pending = cf.wait(pending, timeout=0.5)
            for f in finished:
                f.result()  # re-raise a worker's error
            try:
                while True:
                    advance(q.get_nowait())
            except queue_mod.Empty:
                pass
