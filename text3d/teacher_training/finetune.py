"""Fine-tuning an existing teacher's UNet and text encoder, with chosen examples weighted up.

The from-scratch run (:mod:`text3d.teacher_training.run`) learns object and colour long before it
learns the view suffix: the view changes only a small part of the image (where the house's door
or the mug's handle is), so its share of the epsilon loss is tiny. A fine-tune starts from a
written teacher folder, keeps its VAE, tokenizer and latent scaling, and repeats the examples
whose view can be seen (objects with a distinct front and back, captions with a view suffix)
``view_repeat`` times in every epoch; everything else is replayed once so nothing is forgotten.

It is the same :class:`~text3d.teacher_training.stages.DiffusionStage` as stage 2 (loss, EMA,
checkpoints, resume, time budget); the EMA starts from the loaded weights.
"""

from __future__ import annotations

import copy
import os
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from text3d.cameras import CameraSamplerConfig
from text3d.errors import UserError
from text3d.prompts import split_view_suffix
from text3d.teacher_training import export
from text3d.teacher_training.data import caption_table, tokenize
from text3d.runtime.signals import StopRequest
from text3d.teacher_training.config import TeacherTrainConfig
from text3d.teacher_training.stages import DiffusionStage, load_stage_state, run_stage
from text3d.toyworld.dataset import ToyworldDataset
from text3d.runtime.atomic import atomic_dir

FINETUNE_CKPT = "finetune.ckpt"
FINETUNE_LATENTS = "finetune_latents.pt"
_VIEW_SUFFIX = re.compile(r",\s*(\w+) view\s*$")


def view_example_mask(dataset: ToyworldDataset, objects: Sequence[str] | None = None,
                      labels: Sequence[str] | None = None) -> np.ndarray:
    """True for the examples whose caption names a view (one of ``labels``, default any) and whose object looks
    different from the front and back.

    The objects are ``objects``, else the dataset's own list (``front_back_objects`` in its meta.json),
    else the world catalog's."""
    from text3d.toyworld.catalog import FRONT_BACK_OBJECTS

    names = list(dataset.meta.get("objects", []))
    if objects is None:
        objects = dataset.meta.get("front_back_objects", FRONT_BACK_OBJECTS)
    wanted = {names.index(o) for o in objects if o in names}
    obj = np.asarray(dataset.arrays["object"]).astype(np.int64)
    found = [_VIEW_SUFFIX.search(str(c)) for c in dataset.arrays["captions"]]
    has_view = np.asarray([m is not None and (labels is None or m.group(1) in labels) for m in found])
    return np.isin(obj, list(wanted)) & has_view


def select_examples(mask: np.ndarray, replay: int | None, seed: int) -> np.ndarray:
    """Indices of the examples to fine-tune on: every ``mask`` example and ``replay`` others (a seeded
    choice; None = all of them), in index order."""
    others = np.flatnonzero(~mask)
    if replay is not None and replay < len(others):
        others = np.random.default_rng(seed).choice(others, size=max(0, replay), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(mask), others]))


def weighted_indices(mask: np.ndarray, repeat: int) -> np.ndarray:
    """Every example once, and the ``mask`` examples ``repeat`` times in all (in index order)."""
    if repeat < 1:
        raise UserError(f"--view-repeat must be >= 1, got {repeat}")
    base = np.arange(len(mask))
    extra = np.repeat(np.flatnonzero(mask), repeat - 1)
    return np.concatenate([base, extra])


def _encode(work: Path, vae, images_u8: np.ndarray, device: torch.device, init: Path, log) -> torch.Tensor:
    """VAE posterior means (unscaled) of ``images_u8``, cached in the work folder per (teacher, image count)."""
    from text3d.teacher_training.run import encode_dataset
    from text3d.runtime.checkpoint import load_checkpoint, save_checkpoint

    import hashlib

    path = work / FINETUNE_LATENTS
    vae_file = next((init / "vae").glob("*.safetensors"), None) or next((init / "vae").glob("*.bin"), None)
    images_hash = hashlib.sha1(np.ascontiguousarray(images_u8[:: max(1, len(images_u8) // 64)]).tobytes())
    key = {"n": len(images_u8), "images": images_hash.hexdigest(),
           "vae": hashlib.sha1(vae_file.read_bytes()).hexdigest() if vae_file else ""}
    if path.exists():
        try:
            cached = load_checkpoint(path)
            if cached["key"] == key:
                return cached["latents"]
        except (UserError, KeyError):
            pass
    t0 = time.perf_counter()
    latents = encode_dataset(vae, images_u8, device)
    save_checkpoint(path, {"key": key, "latents": latents})
    log(f"latents: {tuple(latents.shape)} in {time.perf_counter() - t0:.0f} s")
    return latents


def _views_phrase(views: Sequence[str] | None) -> str:
    return "" if not views else " " + " or ".join(f'"{v}"' for v in views)


def finetune_card(previous: str, info: dict) -> str:
    """The init teacher's model card with a fine-tune section added after its earlier ones (before the
    judge scores, which are reset: they were measured on the old weights)."""
    r, s = info["results"], info["settings"]
    number = len(re.findall(r"^## Fine-tune\b", previous, flags=re.M)) + 1
    section = "\n".join([
        f"## Fine-tune {number}",
        "",
        f"Started from `{info['init']}` and trained its UNet and text encoder (the VAE, tokenizer and latent",
        f"scaling kept) for {r['steps_run']}/{s['unet_steps']} steps of batch {s['batch_size']} on {info['n']} of the",
        f"{info['n_data']} images of `{info['data']}`: every example once per epoch and the {info['n_view']} with a visible",
        f"view (a{_views_phrase(info.get('repeat_views'))} view suffix on an object with a distinct front and back) "
        f"{info['view_repeat']} times, so they",
        f"make {info['view_share']:.0%} of the batches. AdamW lr {s['lr']:g} (text encoder {s['text_lr_scale']:g}x; "
        f"warm-up {s['warmup_steps']}, cosine",
        f"to {s['min_lr_ratio']:g}x), Min-SNR-{s['min_snr_gamma']:g}, {s['cond_drop']:.0%} empty captions, EMA",
        f"{s['ema_decay']:g} from the loaded weights; {info['device']}, {info['threads']} thread(s), "
        f"{r['time_s'] / 60:.1f} min" + (" (stopped early at the time budget)" if r.get("stopped_early") else "")
        + ".",
        "",
        *([] if info.get("camera_drop") is None else [
            "View-aware: the UNet takes the camera (`class_embed_type: projection`, 16 inputs: the flattened",
            "camera-to-world matrix of `text3d.cameras.camera_features`, zeros for no camera), its embedding added to the",
            "timestep embedding and trained on each image's true camera (elevation, azimuth, distance, field of view of",
            f"the render), dropped for {info['camera_drop']:.0%} of the examples so that it still works without one; the",
            f"camera MLP learnt at {s['camera_lr_scale']:g}x the UNet's rate."
            + (f" Of the examples that kept their camera, {info['suffix_drop']:.0%} saw their caption without its view "
               "suffix, so the facing direction had to come from the camera." if info.get("suffix_drop") else "")
            + (f" The camera was dropped only from images seen from at most {info['camera_drop_max_elevation']:g} "
               f"degrees up and from no nearer than the usual {CameraSamplerConfig().radius[0]:g}, so without a camera "
               "the teacher samples those views." if info.get("camera_drop_max_elevation") is not None else "")
            + " A",
            "camera input that starts at zero (`text3d.teacher_training.camera_input`) kept the loaded teacher's predictions",
            "at the start. Guidance passes each rendered view's camera (`Teacher.viewing`).", ""]),
        "Final losses (mean of the last 100 steps): " + ", ".join(f"{k} {v:.4g}" for k, v in r["losses"].items()),
        "",
        "```bash",
        info.get("command") or "text3d teacher train --init text3d/assets/teacher",
        "```",
        "",
    ])
    marker = "## Judge scores"
    at = previous.find(marker)
    body = previous[:at] + section + "\n" + previous[at:] if at >= 0 else previous.rstrip() + "\n\n" + section
    begin, end = body.find(export.JUDGE_BEGIN), body.find(export.JUDGE_END)
    if begin >= 0 and end > begin:
        body = body[: begin + len(export.JUDGE_BEGIN)] + "\n" + export.JUDGE_PLACEHOLDER + "\n" + body[end:]
    return body


def finetune_teacher(cfg: TeacherTrainConfig, dataset: ToyworldDataset, init: str | Path, view_repeat: int = 3,
                     replay: int | None = None, data_path: str = "", log=print, stop: StopRequest | None = None,
                     on_step=None, repeat_views: Sequence[str] | None = None,
                     camera_drop: float | None = None, suffix_drop: float = 0.0,
                     camera_drop_max_elevation: float | None = None) -> dict:
    """Fine-tune the teacher in ``init`` on ``dataset`` (``cfg.unet_steps`` steps) and write it into ``cfg.out``.

    ``replay`` caps the examples without a visible view that are kept (None = all): encoding the
    dataset through the VAE costs ~15 ms an image on 2 CPU cores, so a 50k dataset is cut to what
    the fine-tune's steps will see. ``repeat_views`` (view labels, default all) picks which of the kept
    visible-view examples are repeated ``view_repeat`` times; the others are kept and seen once.
    ``camera_drop`` (None: off) teaches the camera: the UNet gets a camera input if it has none
    (:mod:`text3d.teacher_training.camera_input`) and sees each example's true camera, except for a
    ``camera_drop`` fraction that see "no camera". ``suffix_drop`` (with ``camera_drop``) gives a fraction of the
    examples that keep their camera the caption without its view suffix ("a red car" for "a red car, back
    view"), so that which way the object faces is learnt from the camera, not only from the words.
    ``camera_drop_max_elevation`` (degrees; None: every example) drops the camera only from examples seen from at most
    that high (and from no nearer than the usual distance, ``CameraSamplerConfig().radius[0]``): trained on a
    dataset rendered from higher up or nearer (``text3d toyworld render --max-elevation --min-radius``), the teacher
    then still samples the usual views when it gets no camera, and takes the others only when asked by one."""
    from text3d.teacher.loader import load_components
    from text3d.teacher_training.run import available_threads
    from text3d.utils.backends import resolve_device

    t_start = time.perf_counter()
    init = Path(init).expanduser().resolve()
    if not (init / "model_index.json").is_file():
        raise UserError(f"--init {init} is not a teacher folder (no model_index.json)")
    device = resolve_device(cfg.device)
    threads = cfg.threads or available_threads()
    torch.set_num_threads(threads)
    work, out = Path(cfg.work).expanduser(), Path(cfg.out).expanduser()
    export.check_output_folder(out.resolve())
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / FINETUNE_CKPT
    if cfg.fresh and ckpt.exists():
        ckpt.unlink()
    state = load_stage_state(ckpt) if cfg.resume and ckpt.exists() else None
    if cfg.resume and state is None:
        log(f"no checkpoint in {work}: starting the fine-tune from {init}")
    if not cfg.resume and ckpt.exists():
        raise UserError(f"{work} holds a fine-tune checkpoint: continue it with --resume or start over with --fresh")

    parts = load_components(str(init), torch.device("cpu"), torch.float32)
    vae, unet, text_encoder = parts["vae"].eval(), parts["unet"], parts["text_encoder"]
    tokenizer, scheduler = parts["tokenizer"], parts["scheduler"]
    unet.requires_grad_(True)
    text_encoder.requires_grad_(True)
    scaling = float(vae.config.scaling_factor)

    views = list(repeat_views) if repeat_views else None  # None: every view label
    # every visible-view example is kept whatever ``views`` says (dropping the unrepeated labels into the
    # replay pool taught the model to forget them); only the ``views`` ones are repeated
    full_mask = view_example_mask(dataset)
    repeat_mask = view_example_mask(dataset, labels=views) if views else full_mask
    keep = select_examples(full_mask, replay, cfg.seed)
    images_u8, mask = dataset.arrays["images"][keep], repeat_mask[keep]
    captions = [str(dataset.arrays["captions"][i]) for i in keep]
    if suffix_drop and camera_drop is None:
        raise UserError("a view-suffix drop needs --camera-drop (the camera has to carry the view instead)")
    if camera_drop_max_elevation is not None and camera_drop is None:
        raise UserError("--camera-drop-max-elevation needs --camera-drop")
    plain_captions = [split_view_suffix(c)[0] for c in captions]
    distinct, caption_index = caption_table(captions + (plain_captions if suffix_drop else []))
    plain_index = caption_index[len(captions):] if suffix_drop else None
    caption_index = caption_index[:len(captions)]
    order = weighted_indices(mask, view_repeat)
    view_share = float(mask[order].mean()) if len(order) else 0.0
    latents = _encode(work, vae.to(device), images_u8, device, init, log) * scaling
    log(f"fine-tune: {len(images_u8)} of {len(full_mask)} images, {int(mask.sum())} with a visible view repeated {view_repeat}x "
        f"({view_share:.0%} of the batches); {cfg.unet_steps} steps of batch {cfg.batch_size}, {threads} thread(s)")

    cameras = None
    if camera_drop is not None:
        from text3d.teacher_training.camera_input import dataset_camera_features, with_camera_input

        unet = with_camera_input(unet, seed=cfg.seed)
        unet.requires_grad_(True)
        cameras = dataset_camera_features(dataset.arrays, keep[order])
        log(f"camera: the UNet sees each example's camera, dropped for {camera_drop:.0%} of them")
        if camera_drop_max_elevation is not None:  # the usual views only: not higher, and not nearer than usual
            near = CameraSamplerConfig().radius[0]
            droppable = ((np.asarray(dataset.arrays["elevation"])[keep[order]] <= camera_drop_max_elevation)
                         & (np.asarray(dataset.arrays["radius"])[keep[order]] >= near - 1e-4))
            log(f"camera: dropped only from the {droppable.mean():.0%} of examples seen from at most "
                f"{camera_drop_max_elevation:g} degrees up and at least {near:g} away")
    stage = DiffusionStage(cfg, device, unet, text_encoder, scheduler, latents[torch.as_tensor(order)],
                           tokenize(tokenizer, distinct), caption_index[order], tokenize(tokenizer, [""])[0],
                           cameras=cameras, camera_drop=camera_drop or 0.0,
                           plain_caption_index=None if plain_index is None else plain_index[order],
                           suffix_drop=suffix_drop,
                           camera_droppable=None if camera_drop_max_elevation is None else droppable)
    if suffix_drop:
        log(f"view suffix: dropped from the caption of {suffix_drop:.0%} of the examples that keep their camera")
    extra = {"init": str(init), "n": len(images_u8), "view_repeat": view_repeat, "scaling_factor": scaling,
             "repeat_views": views, "camera_drop": camera_drop, **({"suffix_drop": suffix_drop} if suffix_drop else {}),
             **({} if camera_drop_max_elevation is None else {"camera_drop_max_elevation": camera_drop_max_elevation})}
    if state is not None:
        if (int(state.get("n", -1)) != len(images_u8) or int(state.get("view_repeat", -1)) != view_repeat
                or state.get("repeat_views") != views or state.get("camera_drop") != camera_drop
                or float(state.get("suffix_drop", 0.0)) != float(suffix_drop)
                or state.get("camera_drop_max_elevation") != camera_drop_max_elevation):
            raise UserError(f"the checkpoint in {work} fine-tuned on {state.get('n')} images with view repeat "
                            f"{state.get('view_repeat')} (views {state.get('repeat_views') or 'all'}); this run has "
                            f"{len(images_u8)} and {view_repeat} (views {views or 'all'}) "
                            f"(resume with the same --data, --replay, --view-repeat and --repeat-views)")
        stage.load_state_dict(state)
    budget = None  # the invocation's wall clock, less what loading and encoding took and ~30 s to write
    if cfg.time_budget_min:
        budget = max(1.0, cfg.time_budget_min * 60.0 - (time.perf_counter() - t_start) - 30.0)
    with (stop or StopRequest()) as flag:  # Ctrl-C: checkpoint, then Interrupted
        run_stage(stage, ckpt, extra, budget, flag, log, on_step)

    final_unet, final_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    stage.ema_unet.copy_to(final_unet)
    stage.ema_text.copy_to(final_text)
    shown_init = os.path.relpath(init) if init.is_relative_to(Path.cwd()) else str(init)  # the card travels
    info = {"init": shown_init, "data": str(data_path), "n": len(images_u8), "n_data": len(full_mask),
            "n_view": int(mask.sum()), "repeat_views": views, "camera_drop": camera_drop, "suffix_drop": suffix_drop,
            "camera_drop_max_elevation": camera_drop_max_elevation,
            "view_repeat": view_repeat, "view_share": view_share, "device": str(device), "threads": threads,
            "command": cfg.command,
            "settings": {k: getattr(cfg, k) for k in ("unet_steps", "batch_size", "lr", "text_lr_scale", "camera_lr_scale",
                                                      "warmup_steps",
                                                      "min_lr_ratio", "min_snr_gamma", "cond_drop", "ema_decay")},
            "results": {"steps_run": stage.step, "time_s": stage.elapsed, "stopped_early": stage.stopped_early,
                        "losses": stage.running.means(), "wall_time_s": time.perf_counter() - t_start}}
    previous = (init / export.CARD_NAME).read_text() if (init / export.CARD_NAME).is_file() else ""
    n_check = min(8, len(images_u8))
    check_images = torch.from_numpy(np.ascontiguousarray(images_u8[:n_check])).permute(0, 3, 1, 2).float() / 255.0
    out = out.resolve()
    with atomic_dir(out) as tmp:
        export.save_components(tmp, vae, final_unet, final_text, init / "tokenizer", scheduler)  # files as they were
        checks = export.verify_teacher(tmp, check_images, captions[:n_check])
        (tmp / export.CARD_NAME).write_text(finetune_card(previous, info))
    info["checks"] = {**checks, "size_bytes": export.folder_size(out)}
    log(f"wrote {out} ({info['checks']['size_bytes'] / 2**20:.1f} MB) after {stage.step} fine-tune steps")
    return info
