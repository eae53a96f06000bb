"""`text3d eval`: score sampled images (``eval images``) and generated assets (``eval run``) with the judge
(and, for assets, optionally with CLIP R-precision)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

eval_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                       help="Score generated images with the judge classifier.")


@eval_app.callback()
def _group():
    """Score generated images and assets with the judge classifier."""


@eval_app.command("images")
def images(
    folder: Path = typer.Argument(..., help="A folder made by text3d sample (prompts.json + images/)."),
    judge: Optional[Path] = typer.Option(None, "--judge", help="Judge folder (default text3d/assets/judge)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Toyworld dataset folder: also report "
                                             "the Fréchet distance of the judge's features to its renders."),
    device: str = typer.Option("cpu", help="auto | cpu | cuda"),
):
    """Object / colour / view accuracy of the images against their prompts; writes DIR/scores.json."""
    from text3d.eval.score_images import SCORES_NAME, format_scores, score_folder
    from text3d.utils.backends import resolve_device

    result = score_folder(folder, judge=judge, reference=reference, device=resolve_device(device))
    for line in format_scores(result):
        typer.echo(line)
    typer.echo(f"wrote {Path(folder) / SCORES_NAME}")


@eval_app.command("run")
def run(
    run_dir: Path = typer.Argument(..., help="A run folder made by text3d generate (an embedded-world prompt, or "
                                   "any prompt with --clip)."),
    judge: Optional[Path] = typer.Option(None, "--judge", help="Judge folder (default text3d/assets/judge)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP model folder or hub id (e.g. "
                                       "openai/clip-vit-base-patch32): also report CLIP R-precision; a prompt "
                                       "outside the embedded world is then scored by CLIP alone."),
    clip_prompts: Optional[Path] = typer.Option(None, "--clip-prompts", help="Distractor prompts for --clip, one a "
                                                "line (default: the world's captions for its prompts, else "
                                                "text3d/assets/eval/clip_prompts.txt)."),
):
    """Render the run's exported mesh from 8 views: judge accuracies, silhouette IoU, Janus rate, and with --clip
    CLIP R-precision (RUN_DIR/eval.json)."""
    from text3d.errors import UserError
    from text3d.eval.score_run import EVAL_NAME, format_run_scores, score_run

    if clip_prompts is not None and clip is None:
        raise UserError("--clip-prompts needs --clip MODEL (a CLIP folder or hub id)")
    result = score_run(run_dir, judge=judge, clip=clip, clip_prompts=clip_prompts)
    for line in format_run_scores(result):
        typer.echo(line)
    typer.echo(f"wrote {Path(run_dir) / EVAL_NAME}")
    from text3d.report.page import PAGE_NAME, write_run_page

    if (Path(run_dir) / PAGE_NAME).is_file():  # the run page shows the new scores
        typer.echo(f"updated {write_run_page(Path(run_dir))}")
