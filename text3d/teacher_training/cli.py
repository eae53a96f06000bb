"""`text3d teacher train ...`: train the embedded teacher (a small Stable-Diffusion-format latent diffusion model)
on the synthetic world, or fine-tune a written one with --init.

    text3d teacher train --data DIR [--render N] [--out DIR] [--work runs/teacher-train] [--vae-steps N]
        [--unet-steps N] [--batch-size B] [--vae-batch-size B] [--lr LR] [--vae-lr LR] [--seed S]
        [--device auto|cpu|cuda] [--precision auto|fp32|bf16|fp16] [--threads N] [--resume | --fresh]
        [--time-budget-min M] [--checkpoint-every N] [--no-preview] [--no-progress]
    text3d teacher train --init text3d/assets/teacher --data DIR --out DIR --unet-steps N [--view-repeat K] ...

Stage 1 trains the VAE, stage 2 the UNet and the text encoder on cached latents; the result is written with
save_pretrained into --out (atomically) with a model card README.md. Ctrl-C saves a checkpoint and exits 130;
--resume continues the current stage from its last checkpoint. With --init, only stage 2 runs, as a fine-tune
of the teacher folder given (its VAE, tokenizer and latent scaling kept), with the examples whose view can be
seen repeated --view-repeat times. ``scripts/train_teacher.py`` is a wrapper of this command.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Optional

import typer

from text3d.errors import UserError
from text3d.teacher_training.config import TeacherTrainConfig

COMMAND = ("text3d", "teacher", "train")
_D = TeacherTrainConfig()

teacher_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                          help="Train the embedded teacher on the synthetic world, or fine-tune one (--init).")


@teacher_app.callback()
def _teacher() -> None:
    """Train the embedded teacher on the synthetic world, or fine-tune one (--init)."""


def reproduce_command(args: list[str], meta: dict) -> str:
    """The command line of a run given ``args``; a real (non-fake) dataset gets --render/--render-seed so it can
    be rebuilt."""
    args = list(args)
    if (meta.get("elevation") or meta.get("radius")) and "--data" in args and meta.get("n") is not None:
        # rendered with a non-default camera range (toyworld render --max-elevation / --min-radius): --render
        # cannot say so, so the render is its own command before the training
        data = args[args.index("--data") + 1]
        render = ["text3d", "toyworld", "render", "--n", str(meta["n"]), "--out", data, "--seed",
                  str(meta.get("seed", 0))]
        if meta.get("elevation"):
            render += ["--max-elevation", f"{meta['elevation'][1]:g}"]
        if meta.get("radius"):
            render += ["--min-radius", f"{meta['radius'][0]:g}"]
        return shlex.join(render) + " && " + shlex.join([*COMMAND, *args])
    if not meta.get("fake") and "--render" not in args and meta.get("n") is not None:
        args += ["--render", str(meta["n"]), "--render-seed", str(meta.get("seed", 0))]
    return shlex.join([*COMMAND, *args])


def given_args(ctx: typer.Context) -> list[str]:
    """The options given on the command line, in canonical form (definition order)."""
    args: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name in ctx.params else None
        if getattr(source, "name", None) != "COMMANDLINE":  # by name: typer may bring its own copy of click
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if getattr(param, "is_flag", False):
            if value:
                args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


def _check(args: dict) -> list[str] | None:
    """Validate the options (one-line UserErrors); return --repeat-views as a list of view labels."""
    for name in ("vae_steps", "unet_steps"):
        if args[name] < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {args[name]}")
    for name in ("batch_size", "vae_batch_size", "checkpoint_every", "view_repeat"):
        if args[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {args[name]}")
    for name in ("render", "fake"):
        if args[name] is not None and args[name] < 1:
            raise UserError(f"--{name} must be >= 1, got {args[name]}")
    if args["replay"] is not None and args["replay"] < 0:
        raise UserError(f"--replay must be >= 0, got {args['replay']}")
    if args["resume"] and args["fresh"]:
        raise UserError("--resume and --fresh cannot be combined")
    if args["time_budget_min"] is not None and args["time_budget_min"] <= 0:
        raise UserError(f"--time-budget-min must be > 0, got {args['time_budget_min']}")
    if args["camera_drop"] is not None:
        if args["init"] is None:
            raise UserError("--camera-drop needs --init (the camera is taught in a fine-tune)")
        if not 0.0 <= args["camera_drop"] < 1.0:
            raise UserError(f"--camera-drop must be in [0, 1), got {args['camera_drop']}")
    if not 0.0 <= args["suffix_drop"] <= 1.0:
        raise UserError(f"--suffix-drop must be in [0, 1], got {args['suffix_drop']}")
    if args["suffix_drop"] and args["camera_drop"] is None:
        raise UserError("--suffix-drop needs --camera-drop (the camera has to carry the view instead)")
    if args["camera_drop_max_elevation"] is not None and args["camera_drop"] is None:
        raise UserError("--camera-drop-max-elevation needs --camera-drop")
    if args["camera_lr_scale"] <= 0:
        raise UserError(f"--camera-lr-scale must be > 0, got {args['camera_lr_scale']}")
    if args["repeat_views"] is None:
        return None
    from text3d.cameras import VIEW_LABELS

    labels = [v.strip() for v in args["repeat_views"].split(",") if v.strip()]
    unknown = [v for v in labels if v not in VIEW_LABELS]
    if unknown or not labels:
        raise UserError(f"--repeat-views: unknown view label(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(VIEW_LABELS)}")
    return labels


@teacher_app.command("train")
def train_cmd(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="toyworld dataset folder (meta.json + shards)"),
    render: Optional[int] = typer.Option(None, "--render", metavar="N",
                                         help="render N examples into --data first if it has no meta.json"),
    render_seed: Optional[int] = typer.Option(None, "--render-seed",
                                              help="seed of the rendered dataset (default: --seed)"),
    fake: Optional[int] = typer.Option(None, "--fake", metavar="N",
                                       help="write N fake coloured-shape examples into --data if it has no meta.json "
                                            "(smoke runs)"),
    out: Optional[Path] = typer.Option(None, "--out", show_default=False,
                                       help="teacher folder to write (required; text3d/assets/teacher in a "
                                            "checkout replaces the embedded teacher)"),
    work: Path = typer.Option(Path(_D.work), "--work", help="checkpoints, latents cache, samples"),
    vae_steps: int = typer.Option(_D.vae_steps, "--vae-steps"),
    unet_steps: int = typer.Option(_D.unet_steps, "--unet-steps"),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", help="UNet stage batch size"),
    vae_batch_size: int = typer.Option(_D.vae_batch_size, "--vae-batch-size"),
    lr: float = typer.Option(_D.lr, "--lr", help="peak learning rate of the UNet and text encoder"),
    vae_lr: float = typer.Option(_D.vae_lr, "--vae-lr"),
    seed: int = typer.Option(_D.seed, "--seed"),
    device: str = typer.Option(_D.device, "--device", help="auto | cpu | cuda[:N]"),
    precision: str = typer.Option(_D.precision, "--precision",
                                  help="auto (bf16/fp16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16"),
    threads: int = typer.Option(_D.threads, "--threads", help="CPU threads (0 = every core available)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint of the current stage"),
    fresh: bool = typer.Option(False, "--fresh", help="delete the work folder's checkpoints and start over"),
    time_budget_min: Optional[float] = typer.Option(None, "--time-budget-min",
                                                    help="stop at this wall-clock budget (minutes), still write "
                                                         "the model"),
    checkpoint_every: int = typer.Option(_D.checkpoint_every, "--checkpoint-every", help="steps between checkpoints"),
    no_preview: bool = typer.Option(False, "--no-preview", help="do not sample a preview grid at the end"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar (periodic log lines only)"),
    init: Optional[Path] = typer.Option(None, "--init",
                                        help="fine-tune this teacher folder instead of training from scratch"),
    view_repeat: int = typer.Option(3, "--view-repeat",
                                    help="with --init: copies per epoch of the examples whose view can be seen"),
    repeat_views: Optional[str] = typer.Option(None, "--repeat-views", metavar="LABELS",
                                               help="with --init: repeat only the visible-view examples with these "
                                                    "view labels (comma-separated, e.g. front,back; default every "
                                                    "label); the other visible-view examples are kept and seen once"),
    replay: Optional[int] = typer.Option(None, "--replay", metavar="N",
                                         help="with --init: keep only N examples without a visible view (a seeded "
                                              "choice; default all)"),
    text_lr_scale: float = typer.Option(_D.text_lr_scale, "--text-lr-scale",
                                        help="the text encoder's learning rate as a multiple of --lr"),
    camera_lr_scale: float = typer.Option(_D.camera_lr_scale, "--camera-lr-scale",
                                          help="with --camera-drop: the camera MLP's learning rate as a multiple of "
                                               "--lr"),
    ema_decay: float = typer.Option(_D.ema_decay, "--ema-decay", help="EMA decay of the shipped UNet/text weights"),
    warmup_steps: int = typer.Option(_D.warmup_steps, "--warmup-steps"),
    camera_drop: Optional[float] = typer.Option(None, "--camera-drop", metavar="P",
                                                help="with --init: teach the teacher the camera (a view-aware "
                                                     "teacher; a teacher without a camera input gets one), dropping "
                                                     "it from a fraction P of the examples"),
    suffix_drop: float = typer.Option(0.0, "--suffix-drop", metavar="P",
                                      help="with --camera-drop: of the examples that keep their camera, a fraction "
                                           "P see their caption without its view suffix (the camera must tell the "
                                           "view)"),
    camera_drop_max_elevation: Optional[float] = typer.Option(
        None, "--camera-drop-max-elevation", metavar="DEG",
        help="with --camera-drop: drop the camera only from images seen from at most DEG degrees up and from no "
             "nearer than the usual 2.6, so a teacher fine-tuned on renders from higher up or nearer (toyworld "
             "render --max-elevation / --min-radius) still samples the usual views without a camera"),
):
    """Train the teacher on the toyworld dataset in --data, or fine-tune one with --init.

    Stage 1 trains the VAE, stage 2 the UNet and the text encoder; the teacher is written into --out with a model
    card. Ctrl-C saves a checkpoint and exits 130 (--resume continues). --init runs stage 2 only, from that
    teacher folder."""
    views = _check(dict(ctx.params))
    from text3d.teacher_training.data import load_dataset, write_fake_dataset

    if out is None:  # no silent default: it would overwrite the embedded teacher of the installed package
        raise UserError("give --out DIR, the teacher folder to write (text3d/assets/teacher in a checkout "
                        "replaces the embedded teacher)")
    data_seed = seed if render_seed is None else render_seed
    t0 = time.perf_counter()
    if fake and not (data / "meta.json").is_file():
        write_fake_dataset(data, fake, seed=data_seed)
    dataset = load_dataset(data, render=render, seed=data_seed, progress=not no_progress)
    if render:
        typer.echo(f"dataset {data}: {len(dataset)} examples ({time.perf_counter() - t0:.0f} s)")
    cfg = TeacherTrainConfig(
        out=str(out), work=str(work), vae_steps=vae_steps, unet_steps=unet_steps, vae_batch_size=vae_batch_size,
        batch_size=batch_size, vae_lr=vae_lr, lr=lr, seed=seed, device=device, precision=precision, threads=threads,
        checkpoint_every=checkpoint_every, warmup_steps=warmup_steps, text_lr_scale=text_lr_scale,
        camera_lr_scale=camera_lr_scale, ema_decay=ema_decay, time_budget_min=time_budget_min, resume=resume,
        fresh=fresh, preview=not no_preview,
        progress=not no_progress, command=reproduce_command(given_args(ctx), dataset.meta))

    def log(message: str) -> None:
        typer.echo(message)

    if init is not None:
        from text3d.teacher_training.finetune import finetune_teacher

        info = finetune_teacher(cfg, dataset, init, view_repeat=view_repeat, replay=replay, data_path=str(data),
                                repeat_views=views, log=log, camera_drop=camera_drop, suffix_drop=suffix_drop,
                                camera_drop_max_elevation=camera_drop_max_elevation)
        r = info["results"]
        typer.echo(f"done in {r['wall_time_s'] / 60:.1f} min: {r['steps_run']} fine-tune steps; teacher in {out}")
        return
    from text3d.teacher_training.run import train_teacher

    info = train_teacher(cfg, dataset, data_path=data, log=log)
    r = info["results"]
    typer.echo(f"done in {r['wall_time_s'] / 60:.1f} min: VAE {r['vae_steps_run']} steps, UNet {r['unet_steps_run']} "
               f"steps; teacher in {out}")
