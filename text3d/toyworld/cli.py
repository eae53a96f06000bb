"""`text3d toyworld ...`: render the synthetic world's dataset and list its objects, colours and captions."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

toyworld_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                           help="The embedded synthetic world (coloured primitives and front/back objects): "
                                "render its captioned image dataset, list what it contains.")


@toyworld_app.command("render")
def render_cmd(
    n: int = typer.Option(..., "--n", help="Number of images."),
    out: Path = typer.Option(..., "--out", help="Dataset folder (shards + meta.json); an interrupted render "
                                                "into it resumes."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same dataset."),
    resolution: int = typer.Option(64, help="Image side in pixels."),
    shard_size: int = typer.Option(2000, "--shard-size", help="Images per shard file."),
    p_plain_caption: float = typer.Option(0.3, "--p-plain-caption",
                                          help="Fraction of captions without a view suffix."),
    workers: Optional[int] = typer.Option(None, help="Render shards in this many processes (default: one per CPU "
                                                     "core, at most 4)."),
    max_elevation: Optional[float] = typer.Option(None, "--max-elevation", metavar="DEG",
                                                  help="Top of the cameras' elevation range (default 45, as "
                                                       "`text3d generate` trains): higher shows the objects from "
                                                       "above, 60 and up with the \"overhead view\" suffix."),
    min_radius: Optional[float] = typer.Option(None, "--min-radius", metavar="R",
                                               help="Nearest camera distance (default 2.6, as `text3d generate` "
                                                    "trains; the farthest is 3.0): lower shows the objects larger."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Render N captioned images of random objects, colours and training cameras into OUT."""
    from text3d.toyworld.generate import render_dataset

    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))
    t0 = time.perf_counter()
    folder = render_dataset(out, n, seed=seed, resolution=resolution, shard_size=shard_size,
                            p_plain_caption=p_plain_caption, progress=not quiet, workers=workers,
                            max_elevation=max_elevation, min_radius=min_radius)
    seconds = time.perf_counter() - t0
    typer.echo(f"done: {n} images ({resolution}x{resolution}) in {folder} ({seconds:.1f}s)")


@toyworld_app.command("list")
def list_cmd(
    captions: bool = typer.Option(False, "--captions", help="Print every caption, one per line, and nothing else."),
):
    """List the world's objects (front/back ones marked), colours and the number of captions."""
    from text3d.toyworld.catalog import COLOURS, OBJECTS, all_captions

    if captions:
        for text in all_captions():
            typer.echo(text)
        return
    typer.echo(f"objects ({len(OBJECTS)}; * = distinct front (+Z) and back):")
    for name, obj in OBJECTS.items():
        mark = "*" if obj.front_back else " "
        typer.echo(f"  {mark} {name:<11} {obj.description}")
    typer.echo(f"colours ({len(COLOURS)}):")
    for name, rgb in COLOURS.items():
        typer.echo(f"    {name:<11} rgb({', '.join(str(round(255 * c)) for c in rgb)})")
    typer.echo(f"captions: {len(all_captions())} (\"a <colour> <object>\", optionally + \", <view> view\")")

