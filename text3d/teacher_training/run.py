"""The whole teacher training run: VAE stage, latent caching, UNet + text encoder stage, writing
the diffusers folder and its model card.

The work folder holds what a resumed run needs:

  tokenizer/   the CLIP tokenizer built for the world's vocabulary
  vae.pt       the VAE stage's last checkpoint (its weights are frozen once unet.pt exists)
  latents.pt   the VAE posterior means of the whole dataset and the scaling factor
  unet.pt      the UNet stage's last checkpoint (UNet, text encoder, their EMA, optimiser, RNG)
  samples.png  real images, VAE reconstructions and samples for the same captions
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from text3d.errors import UserError
from text3d.teacher_training import export
from text3d.teacher_training.data import caption_table, tokenize, world_vocabulary
from text3d.teacher_training.models import (Architecture, build_scheduler, build_text_encoder, build_unet, build_vae,
                                         n_params)
from text3d.runtime.signals import StopRequest
from text3d.teacher_training.config import TeacherTrainConfig
from text3d.teacher_training.stages import DiffusionStage, Stage, VAEStage, load_stage_state, run_stage
from text3d.toyworld.dataset import ToyworldDataset

VAE_CKPT, UNET_CKPT, LATENTS = "vae.pt", "unet.pt", "latents.pt"
PREVIEW = "samples.png"


def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_models(arch: Architecture, tokenizer, seed: int):
    """(vae, unet, text_encoder), each initialised from its own seed."""
    from text3d.teacher.loader import quiet_hf

    with torch.random.fork_rng(devices=[]), quiet_hf():
        torch.manual_seed(seed)
        vae = build_vae(arch)
        torch.manual_seed(seed + 1)
        unet = build_unet(arch)
        torch.manual_seed(seed + 2)
        text_encoder = build_text_encoder(arch, tokenizer)
    return vae, unet, text_encoder


@torch.no_grad()
def encode_dataset(vae, images_u8: np.ndarray, device: torch.device, batch: int = 128) -> torch.Tensor:
    """VAE posterior means [N, 4, 16, 16] (float32, CPU) of every image."""
    from text3d.teacher_training.data import images_to_model

    vae.eval()
    out = []
    for start in range(0, len(images_u8), batch):
        idx = torch.arange(start, min(start + batch, len(images_u8)))
        out.append(vae.encode(images_to_model(images_u8, idx, device)).latent_dist.mean.float().cpu())
    return torch.cat(out)


def benchmark(cfg: TeacherTrainConfig, arch: Architecture, tokenizer, device: torch.device, steps: int,
              thread_choices: Sequence[int] = ()) -> dict:
    """Seconds per training step of each stage and per encoded image, measured on random data with
    fresh models (nothing of the real run is touched).

    With several ``thread_choices`` (CPU) the UNet step is timed with each and the fastest count is
    kept (``threads`` in the result): on a busy machine one thread can beat two by a factor of 3.
    """
    if steps <= 0:
        return {}
    rng = np.random.default_rng(0)
    vae, unet, text_encoder = build_models(arch, tokenizer, 12345)
    with torch.random.fork_rng(devices=[]):
        latents = torch.randn(cfg.batch_size, 4, 16, 16)
        ucfg = replace(cfg, unet_steps=10**9, progress=False)
        stage = DiffusionStage(ucfg, device, unet, text_encoder, build_scheduler(), latents,
                               tokenize(tokenizer, ["a"]), np.zeros(cfg.batch_size, dtype=np.int64),
                               tokenize(tokenizer, [""])[0])
        timings = {}
        for threads in thread_choices or [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            timings[threads] = _time_steps(stage, steps)
        threads = min(timings, key=timings.get)
        torch.set_num_threads(threads)
        fake = rng.integers(0, 256, (max(cfg.vae_batch_size, 64), 64, 64, 3), dtype=np.uint8)
        vcfg = replace(cfg, vae_steps=10**9, progress=False)
        vae_s = _time_steps(VAEStage(vcfg, device, vae, fake[: cfg.vae_batch_size]), steps)
        t0 = time.perf_counter()
        encode_dataset(vae, fake, device, batch=64)
        encode = (time.perf_counter() - t0) / len(fake)
    return {"vae_s_per_step": vae_s, "unet_s_per_step": timings[threads], "encode_s_per_image": encode,
            "threads": threads, "unet_s_per_step_by_threads": timings}


def _time_steps(stage: Stage, steps: int) -> float:
    stage.train_step()  # warm-up (allocations, oneDNN primitive selection)
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        stage.train_step()
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def fit_steps_to_budget(cfg: TeacherTrainConfig, projected: dict, seconds: float, vae_state: dict | None,
                        unet_state: dict | None, vae_done: bool, log) -> TeacherTrainConfig:
    """Shrink the remaining steps of both stages in proportion so the projected run fits ``seconds``,
    so that their learning-rate schedules still decay to the end (rather than stopping mid-schedule)."""
    scale = seconds / (projected["vae"] + projected["unet"])
    vae_done_steps = int((vae_state or {}).get("step", 0))
    unet_done_steps = int((unet_state or {}).get("step", 0))
    vae_steps = cfg.vae_steps if vae_done else vae_done_steps + max(1, int((cfg.vae_steps - vae_done_steps) * scale))
    unet_steps = unet_done_steps + max(1, int((cfg.unet_steps - unet_done_steps) * scale))
    log(f"the projected run exceeds the budget: VAE steps {cfg.vae_steps} -> {vae_steps}, UNet steps "
        f"{cfg.unet_steps} -> {unet_steps} (x{scale:.2f})")
    projected["vae"] *= scale
    projected["unet"] *= scale
    return replace(cfg, vae_steps=min(cfg.vae_steps, vae_steps), unet_steps=min(cfg.unet_steps, unet_steps))


def _fmt(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _prepare_work(work: Path, cfg: TeacherTrainConfig, log) -> tuple[dict | None, dict | None]:
    """Check the work folder against --resume/--fresh; return the (vae, unet) checkpoints to resume from."""
    work.mkdir(parents=True, exist_ok=True)
    ckpts = [work / VAE_CKPT, work / UNET_CKPT, work / LATENTS]
    if cfg.fresh:
        for path in ckpts:
            path.unlink(missing_ok=True)
    elif not cfg.resume and any(p.exists() for p in ckpts):
        raise UserError(f"{work} holds checkpoints of an earlier run: pass --resume to continue it or --fresh to "
                        f"start over")
    if not cfg.resume:
        return None, None
    vae_state = load_stage_state(work / VAE_CKPT) if (work / VAE_CKPT).exists() else None
    unet_state = load_stage_state(work / UNET_CKPT) if (work / UNET_CKPT).exists() else None
    if unet_state is not None and vae_state is None:
        raise UserError(f"{work} has {UNET_CKPT} but no {VAE_CKPT}: the UNet's latents cannot be reproduced; "
                        f"start over with --fresh")
    if vae_state is None:
        log(f"no checkpoint in {work}: starting from scratch")
    return vae_state, unet_state


def _check_same_data(state: dict, n: int) -> None:
    if int(state["dataset"]["n"]) != n:
        raise UserError(f"the checkpoint was trained on {state['dataset']['n']} images, this dataset has {n}: "
                        f"resume with the same --data or start over with --fresh")


def train_teacher(cfg: TeacherTrainConfig, dataset: ToyworldDataset, data_path: str | os.PathLike = "",
                  words: Sequence[str] | None = None, log: Callable[[str], None] = print,
                  stop: StopRequest | None = None, on_step: Callable[[Stage, dict], None] | None = None) -> dict:
    """Train the teacher on ``dataset`` and write it to ``cfg.out``; returns the run summary.

    ``words`` is the tokenizer's whole-word vocabulary (default: the world's vocabulary plus every
    caption word). ``stop`` receives Ctrl-C/SIGTERM (installed here when None); ``on_step`` is
    called after every training step of either stage.
    """
    threads_before = torch.get_num_threads()
    try:
        return _train(cfg, dataset, data_path, words, log, stop, on_step)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg, dataset, data_path, words, log, stop, on_step) -> dict:
    from text3d.teacher.tokenizer import build_clip_tokenizer
    from text3d.utils.backends import resolve_device

    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    threads = cfg.threads or available_threads()
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work, out = Path(cfg.work).expanduser(), Path(cfg.out).expanduser()
    export.check_output_folder(out.resolve())
    vae_state, unet_state = _prepare_work(work, cfg, log)
    resume_from = unet_state or vae_state

    images_u8 = dataset.arrays["images"]
    n = len(images_u8)
    captions = [str(c) for c in dataset.arrays["captions"]]
    distinct, caption_index = caption_table(captions)
    if resume_from is not None:
        _check_same_data(resume_from, n)
        words = list(resume_from["words"])
        arch = Architecture.from_dict(resume_from["arch"])
        if arch != cfg.arch:
            log("resuming with the checkpoint's architecture")
    else:
        words = sorted(set(words)) if words is not None else world_vocabulary(captions)
        arch = cfg.arch
    tokenizer = build_clip_tokenizer(work / "tokenizer", words, model_max_length=arch.text_length)
    vae, unet, text_encoder = build_models(arch, tokenizer, cfg.seed)
    scheduler = build_scheduler()
    params = {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)}
    meta = dataset.meta
    data_info = {"path": str(data_path), "n": n, "seed": meta.get("seed"), "captions": len(distinct),
                 "words": len(words), "fake": bool(meta.get("fake", False))}
    extra = {"words": list(words), "arch": arch.to_dict(), "dataset": data_info,
             "config": {k: v for k, v in asdict(cfg).items() if k not in ("arch",) and not isinstance(v, Path)}}
    log(f"teacher: {n} images, {len(distinct)} captions, {len(words)} words; parameters vae "
        f"{params['vae'] / 1e6:.2f} M, unet {params['unet'] / 1e6:.2f} M, text encoder "
        f"{params['text_encoder'] / 1e6:.2f} M; device {device}, {threads} threads")

    vae_done = unet_state is not None  # the VAE is frozen once the UNet stage has started
    vae_left = 0 if vae_done else max(0, cfg.vae_steps - int((vae_state or {}).get("step", 0)))
    unet_left = max(0, cfg.unet_steps - int((unet_state or {}).get("step", 0)))
    choices = [1, threads] if (not cfg.threads and device.type == "cpu" and threads > 1) else [threads]
    speed = benchmark(cfg, arch, tokenizer, device, cfg.benchmark_steps, choices) if (vae_left or unet_left) else {}
    projected = None
    if speed:
        if speed["threads"] != threads:
            log(f"using {speed['threads']} thread(s): a UNet step took " + ", ".join(
                f"{v:.2f} s with {k}" for k, v in speed["unet_s_per_step_by_threads"].items())
                + " (a busy machine; pin the count with --threads)")
            threads = speed["threads"]
        vae_s = vae_left * speed["vae_s_per_step"]
        enc_s = 0 if unet_state is not None else n * speed["encode_s_per_image"]
        unet_s = unet_left * speed["unet_s_per_step"]
        projected = {"vae": vae_s, "encode": enc_s, "unet": unet_s}
        log(f"measured {1 / speed['vae_s_per_step']:.2f} it/s VAE (batch {cfg.vae_batch_size}), "
            f"{1 / speed['unet_s_per_step']:.2f} it/s UNet (batch {cfg.batch_size}); expected duration "
            f"{_fmt(vae_s + enc_s + unet_s)} (VAE {vae_left} steps {_fmt(vae_s)}, latents {_fmt(enc_s)}, "
            f"UNet {unet_left} steps {_fmt(unet_s)})")
    budget = cfg.time_budget_min * 60.0 if cfg.time_budget_min else None
    reserve = 30.0 + (projected["encode"] if projected else 0.0)  # latents, export and preview
    if budget is not None:
        log(f"time budget {_fmt(budget)}: stages stop early when it runs out; the model is written anyway")
        if projected and projected["vae"] + projected["unet"] > budget - reserve > 0:
            cfg = fit_steps_to_budget(cfg, projected, budget - reserve, vae_state, unet_state, vae_done, log)

    stop = stop or StopRequest()
    with stop:
        # ---------------------------------------------------------------- stage 1: VAE
        vae_stage = VAEStage(cfg, device, vae, images_u8)
        if vae_state is not None:
            vae_stage.load_state_dict(vae_state)
        if not vae_done and vae_stage.step < cfg.vae_steps:
            vae_budget = None
            if budget is not None:
                share = (projected["vae"] / max(1e-9, projected["vae"] + projected["unet"]) if projected
                         else vae_left / max(1, vae_left + unet_left))
                vae_budget = max(1.0, (budget - (time.perf_counter() - t_start) - reserve) * share)
            log(f"stage 1: VAE, steps {vae_stage.step + 1}..{cfg.vae_steps}")
            run_stage(vae_stage, work / VAE_CKPT, extra, vae_budget, stop, log, on_step)
        vae.eval()
        vae.requires_grad_(False)

        # ---------------------------------------------------------------- latents
        latents, scaling = _latents(work, vae, vae_stage, images_u8, device, log)
        if unet_state is not None:  # the UNet was trained on latents scaled by this factor
            scaling = float(unet_state["scaling_factor"])
        latent_mean = float(latents.mean())

        # ---------------------------------------------------------------- stage 2: UNet + text encoder
        caption_ids = tokenize(tokenizer, distinct)
        uncond_ids = tokenize(tokenizer, [""])[0]
        unet_stage = DiffusionStage(cfg, device, unet, text_encoder, scheduler, latents * scaling, caption_ids,
                                    caption_index, uncond_ids)
        if unet_state is not None:
            unet_stage.load_state_dict(unet_state)
        unet_extra = {**extra, "scaling_factor": scaling, "vae_step": vae_stage.step}
        if unet_stage.step < cfg.unet_steps:
            unet_budget = None
            if budget is not None:
                unet_budget = max(1.0, budget - (time.perf_counter() - t_start) - 30.0)
            log(f"stage 2: UNet + text encoder, steps {unet_stage.step + 1}..{cfg.unet_steps}")
            run_stage(unet_stage, work / UNET_CKPT, unet_extra, unet_budget, stop, log, on_step)

    # -------------------------------------------------------------------- write the teacher
    final_unet, final_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet_stage.ema_unet.copy_to(final_unet)
    unet_stage.ema_text.copy_to(final_text)
    final_vae = copy.deepcopy(vae).eval()
    final_vae.register_to_config(scaling_factor=scaling)
    wall = time.perf_counter() - t_start
    results = {
        "scaling_factor": scaling, "latent_mean": latent_mean,
        "vae_steps_run": vae_stage.step, "unet_steps_run": unet_stage.step,
        "vae_time_s": vae_stage.elapsed, "unet_time_s": unet_stage.elapsed,
        "train_time_s": vae_stage.elapsed + unet_stage.elapsed, "wall_time_s": wall,
        "stopped_early": vae_stage.stopped_early or unet_stage.stopped_early,
        "vae_losses": vae_stage.running.means(), "unet_losses": unet_stage.running.means(),
    }
    precision = str(vae_stage.amp).replace("torch.", "") if vae_stage.amp else "fp32"
    info = {"dataset": data_info, "arch": arch.to_dict(), "params": params, "device": str(device),
            "threads": threads, "precision": precision, "command": cfg.command, "results": results,
            "settings": {k: v for k, v in asdict(cfg).items() if k != "arch"}, "speed": speed}
    check_n = min(8, n)
    check_idx = torch.arange(check_n)
    check_images = torch.from_numpy(np.ascontiguousarray(images_u8[:check_n])).permute(0, 3, 1, 2).float() / 255.0
    checks = export.write_teacher(out, final_vae, final_unet, final_text, work / "tokenizer", scheduler, info,
                                  check_images, [captions[i] for i in check_idx.tolist()])
    info["checks"] = checks
    log(f"wrote {out} ({checks['size_bytes'] / 2**20:.1f} MB); load check: latents {checks['latent_shape']}, "
        f"text embeddings {checks['text_embedding_shape']}, reconstruction PSNR "
        f"{checks['recon_psnr']:.1f} dB")
    if checks["size_bytes"] > export.SIZE_LIMIT_MB * 2**20:
        log(f"warning: the teacher folder is {checks['size_bytes'] / 2**20:.1f} MB, over the "
            f"{export.SIZE_LIMIT_MB:.0f} MB budget")
    if cfg.preview:
        info["preview"] = str(preview(out, work / PREVIEW, images_u8, captions, cfg.seed))
        log(f"samples: {info['preview']}")
    return info


def _latents(work: Path, vae, vae_stage: VAEStage, images_u8: np.ndarray, device: torch.device,
             log) -> tuple[torch.Tensor, float]:
    """Posterior means of the whole dataset (cached in latents.pt) and scaling factor = 1 / their std."""
    from text3d.runtime.checkpoint import load_checkpoint, save_checkpoint

    path = work / LATENTS
    key = {"vae_step": vae_stage.step, "n": len(images_u8), "vae_elapsed": vae_stage.elapsed}
    if path.exists():
        try:
            cached = load_checkpoint(path)
            if cached["key"] == key:
                return cached["latents"], float(cached["scaling_factor"])
        except (UserError, KeyError):
            pass
    t0 = time.perf_counter()
    latents = encode_dataset(vae, images_u8, device)
    scaling = float(1.0 / latents.std())
    save_checkpoint(path, {"key": key, "latents": latents, "scaling_factor": scaling})
    log(f"latents: {tuple(latents.shape)} in {_fmt(time.perf_counter() - t0)}; mean {float(latents.mean()):+.4f}, "
        f"std {float(latents.std()):.4f} -> scaling factor {scaling:.5f}")
    return latents, scaling


@torch.no_grad()
def preview(teacher_dir: Path, path: Path, images_u8: np.ndarray, captions: Sequence[str], seed: int,
            count: int = 8) -> Path:
    """Rows: real images, their VAE reconstructions, and samples for the same captions (DDIM 30, CFG 4)."""
    from text3d.teacher import load_teacher

    teacher = load_teacher(str(teacher_dir), "cpu", dtype="fp32")
    distinct, index = caption_table(captions)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(distinct), size=min(count, len(distinct)), replace=False)
    rows_idx = [int(np.flatnonzero(index == p)[0]) for p in picks]
    real = torch.from_numpy(np.ascontiguousarray(images_u8[rows_idx])).permute(0, 3, 1, 2).float() / 255.0
    recon = teacher.decode_latents(teacher.encode_images(real))
    samples = export.sample_images(teacher, [distinct[p] for p in picks], seed=seed)
    return export.save_grid([real, recon, samples], path)
