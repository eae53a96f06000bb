"""The `text3d` command line: generate, export, doctor.

Every failure a user can cause ends as one line on stderr and a non-zero exit code; set
TEXT3D_DEBUG=1 to see the traceback of an unexpected error. Nothing heavy (torch, diffusers) is imported
before the arguments are parsed and checked, so help and argument errors come at once; the commands'
modules import it when their work starts.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import click
import typer

from text3d.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Text-to-3D generation and diffusion distillation that runs on a CPU.")


def _overrides_and_prompt(prompt: Optional[str], extra: Optional[List[str]]) -> tuple[Optional[str], list[str]]:
    overrides = list(extra or [])
    # `text3d generate --resume DIR key=value`: the first override lands in PROMPT's slot
    if prompt is not None and "=" in prompt and " " not in prompt and prompt.split("=", 1)[0].replace(".", "").replace("_", "").isalnum():
        return None, [prompt] + overrides
    return prompt, overrides


@app.command(context_settings={"allow_interspersed_args": True})
def generate(
    prompt: Optional[str] = typer.Argument(None, help="What to make, e.g. \"a red cube\"."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides as key=value, e.g. train.lr=0.005."),
    guidance: Optional[str] = typer.Option(None, help="Guidance method: a registered name, built in sds | vsd (also "
                                           "loads its preset, vsd: text3d/configs/vsd.yaml, unless --config is given)."),
    particles: Optional[int] = typer.Option(None, help="Independent assets optimised together (train.particles); "
                                            "with VSD they share one LoRA."),
    stages: Optional[str] = typer.Option(None, help="Stages to run, in order: nerf,geometry,texture (default nerf)."),
    from_run: Optional[Path] = typer.Option(None, "--from", help="Start from the earlier stages of this run folder "
                                            "(with --stages geometry or texture)."),
    teacher: Optional[str] = typer.Option(None, help="Diffusers Stable Diffusion folder or hub id."),
    config: Optional[List[Path]] = typer.Option(None, "--config", help="YAML config file(s) merged over text3d/configs/default.yaml."),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps (train.steps)."),
    seed: Optional[int] = typer.Option(None, help="Random seed; a seed fixes the run."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/<prompt>-<time>)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder from its last checkpoint."),
    video: Optional[bool] = typer.Option(None, "--video/--no-video", show_default=False,
                                         help="Write a turntable video at the end (default: yes; with --resume, "
                                              "as the run chose)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Optimise a 3D asset for PROMPT and export it (.obj, .glb, turntable video)."""
    prompt, extra = _overrides_and_prompt(prompt, overrides)
    if resume is not None and from_run is not None:
        raise UserError("--from cannot be combined with --resume")
    if resume is not None and config:
        raise UserError("--config cannot be combined with --resume (the run folder has its config)")
    if resume is None and prompt is None:
        raise UserError("give a prompt, e.g. text3d generate \"a red cube\" (or --resume RUN_DIR)")
    from text3d.generate.config import load_config
    from text3d.generate.run import generate as run_generate, resume as run_resume

    flags = []
    for key, value in (("guidance", guidance), ("teacher.name_or_path", teacher), ("train.steps", steps),
                       ("train.particles", particles), ("seed", seed), ("device", device)):
        if value is not None:
            flags.append(f"{key}={value}")
    if stages is not None:
        flags.append(f"stages=[{stages}]")
    if resume is not None:
        result = run_resume(resume, flags + extra, show_progress=not quiet, video=video)
    else:
        if not config and guidance is not None:
            from text3d.generate.config import guidance_preset

            preset = guidance_preset(guidance)  # from the method's registry entry; unknown names: one-line error
            config = [preset] if preset is not None else config
        cfg = load_config(files=config or (), overrides=flags + extra)
        cfg.prompt = prompt
        result = run_generate(cfg, out=out, show_progress=not quiet, video=video is not False, from_dir=from_run)
    typer.echo(f"done: {result.steps} steps in {result.seconds:.1f}s; files in {result.run_dir}")
    for key, value in result.files.items():
        if isinstance(value, (str, Path)):
            typer.echo(f"  {key}: {value}")
        elif isinstance(value, dict):
            for sub, path in value.items():
                if isinstance(path, (str, Path)):
                    typer.echo(f"  {key}/{sub}: {path}")


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder made by text3d generate."),
    format: str = typer.Option("both", "--format", help="obj | glb | ply | both (obj + glb) | all"),
    faces: Optional[int] = typer.Option(None, "--faces", help="Decimate to at most this many faces "
                                        "(quadric edge collapse; default: the run's export.max_faces, 0 = keep all)."),
    video: Optional[bool] = typer.Option(None, "--video/--no-video", show_default=False,
                                         help="Also write the turntable video (default: as the run chose)."),
    device: str = typer.Option("cpu", help="auto | cpu | cuda"),
):
    """Re-export a run's last checkpoint as .obj/.glb/.ply (and a turntable video)."""
    from text3d.generate.choices import FORMATS

    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if faces is not None and faces != 0 and faces < 4:
        raise UserError(f"--faces must be 0 (keep all) or at least 4, got {faces}")
    from text3d.generate.run import export_existing

    files = export_existing(run_dir, FORMATS[format], video=video, device=device, max_faces=faces)
    for key, value in files.items():
        if isinstance(value, (str, Path)):
            typer.echo(f"{key}: {value}")


@app.command()
def doctor(
    overrides: Optional[List[str]] = typer.Argument(None, help="generate config overrides as key=value, e.g. "
                                                    "sds.space=latent, for the memory estimate."),
    teacher: Optional[str] = typer.Option(None, help="Also describe this teacher (folder or hub id in the local "
                                          "cache; nothing is downloaded or loaded)."),
    config: Optional[List[Path]] = typer.Option(None, "--config", help="generate config file(s) whose guidance, "
                                                "batch and teacher settings the memory estimate uses."),
    device: str = typer.Option("auto", help="auto | cpu | cuda: the device the estimate is for."),
):
    """Show which devices and optional backends text3d found; with --teacher (or --config), the teacher's
    resolution, dtype, prediction type and an estimate of each command's peak memory
    (text3d/teacher/memory.py explains the estimate)."""
    from text3d.utils.backends import backend_report

    report = backend_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        typer.echo(f"{key:<{width}}  {value}")
    if teacher is None and not config and not overrides:
        return
    from text3d.distill2d.config import LEAN_MIN_IMAGE_SIZE
    from text3d.generate.config import load_config
    from text3d.teacher.memory import describe, estimate_peak, gb, inspect_teacher
    from text3d.utils.backends import resolve_device

    cfg = load_config(files=config or (), overrides=[*([f"teacher.name_or_path={teacher}"] if teacher else []),
                                                     *(overrides or [])])
    dev = resolve_device(device).type
    info = inspect_teacher(cfg.teacher.name_or_path, dev, cfg.teacher.dtype)
    for key, value in describe(info).items():
        typer.echo(f"{key:<{width}}  {value}")
    method = cfg.guidance if cfg.guidance in ("sds", "vsd") else "sds"
    section = getattr(cfg, method, None)
    space = getattr(section, "space", "latent")
    batch = cfg.train.batch_size
    lean = cfg.teacher.memory == "lean"
    parts = estimate_peak(info, method, batch=batch, space=space, lean=lean)
    detail = ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if k != "total")
    typer.echo(f"{'peak memory':<{width}}  generate --guidance {method} (batch {batch}, {space} space): about "
               f"{gb(parts['total'])} ({detail})")
    lean2d = dev == "cpu" and info.image_size >= LEAN_MIN_IMAGE_SIZE
    parts = estimate_peak(info, "distill2d", batch=1 if lean2d else 8, lean=lean2d,
                          optimizer="adafactor" if lean2d else "adamw")
    detail = ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if k != "total")
    typer.echo(f"{'':<{width}}  distill2d ({'lean mode: batch 1, Adafactor, checkpointed' if lean2d else 'batch 8, AdamW'})"
               f": about {gb(parts['total'])} ({detail})")


@app.command()
def view(
    run_dir: Path = typer.Argument(..., help="A run folder (text3d generate, export or distill2d)."),
    port: int = typer.Option(8765, help="Port on 127.0.0.1 (0: any free port)."),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Open a browser when one is there."),
):
    """Serve a run folder's page (index.html: the asset in a 3D viewer, video, previews, curves) on localhost."""
    from text3d.report.server import serve

    serve(run_dir, port=port, open_browser=browser, echo=typer.echo)


@app.command("app")
def app_cmd(
    teacher: Optional[str] = typer.Option(None, help="Diffusers Stable Diffusion folder or hub id (default: the "
                                          "embedded teacher)."),
    port: int = typer.Option(7860, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 to share on the network)."),
    out: Path = typer.Option(Path("runs/app"), help="Folder for the app's run folders."),
):
    """The web app: type a prompt, watch it train, turn the result in a 3D viewer (needs Gradio: the app extra)."""
    from text3d.app.server import launch

    launch(teacher=teacher, port=port, host=host, out=out, echo=typer.echo)


def _register_subcommands() -> None:
    from text3d.batch.cli import batch
    from text3d.distill2d.cli import distill2d
    from text3d.eval.cli import eval_app
    from text3d.distill2d.sample_cli import sample
    from text3d.teacher_training.cli import teacher_app
    from text3d.toyworld.cli import toyworld_app

    app.command("sample")(sample)
    app.command("distill2d", context_settings={"allow_interspersed_args": True})(distill2d)
    app.command("batch", context_settings={"allow_interspersed_args": True})(batch)
    app.add_typer(eval_app, name="eval", help="Score sampled images and generated assets with the judge.")
    app.add_typer(toyworld_app, name="toyworld", help="The embedded synthetic world: render datasets, list objects.")
    app.add_typer(teacher_app, name="teacher", help="Train the embedded teacher on the synthetic world, or fine-tune "
                                                    "one (--init).")


_register_subcommands()


# recent typer parses with its own copy of click (typer._click), whose errors derive from typer.TyperException
_USAGE_ERRORS = (click.exceptions.ClickException, getattr(typer, "TyperException", click.exceptions.ClickException))
_ABORTS = (click.exceptions.Abort, typer.Abort)


def main(argv: Optional[List[str]] = None) -> int:
    debug = os.environ.get("TEXT3D_DEBUG") == "1"
    if not debug:  # warnings as one plain line each
        warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="text3d", standalone_mode=False)
        return 0
    except UserError as exc:
        _fail(str(exc), exc.exit_code)
    except _ABORTS:
        _fail("interrupted", 130)
    except _USAGE_ERRORS as exc:  # usage, unknown option, bad value: click's message (and usage line)
        if hasattr(exc, "show"):
            exc.show()
        else:
            print(f"error: {exc}", file=sys.stderr)
        return sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as exc:
        if debug:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _fail(f"{exc.strerror or exc}{where}", 1)
    except Exception as exc:  # an unexpected bug: still one line unless debugging
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(set TEXT3D_DEBUG=1 for the traceback)", 1)
    return 0


def _fail(message: str, code: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
