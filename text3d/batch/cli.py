"""`text3d batch PROMPTS.txt --out DIR`: one generate run per prompt, side by side on Ray (optional extra `.[ray]`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer



def batch(
    prompts_file: Path = typer.Argument(..., metavar="PROMPTS.txt", help="One prompt a line (# comments, blank lines "
                                        "skipped; a line in double quotes is a JSON string)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides for every run, as key=value."),
    out: Path = typer.Option(..., help="Batch folder: one run folder per prompt (DIR/<slug>), results.csv/.json, "
                             "index.html."),
    workers: Optional[int] = typer.Option(None, help="Runs side by side (default: one per GPU; on the CPU, cores / "
                                          "--threads)."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per run on the CPU (default: cores / --workers "
                                          "when --workers is given, else 1)."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster: auto | HOST:PORT (default: start "
                                          "a local Ray runtime)."),
    guidance: Optional[str] = typer.Option(None, help="Guidance method: sds | vsd | a registered name."),
    stages: Optional[str] = typer.Option(None, help="Stages to run, in order: nerf,geometry,texture (default nerf)."),
    teacher: Optional[str] = typer.Option(None, help="Diffusers Stable Diffusion folder or hub id."),
    config: Optional[List[Path]] = typer.Option(None, "--config", help="YAML config file(s) merged over the defaults."),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps of each run (train.steps)."),
    seed: Optional[int] = typer.Option(None, help="Random seed of every run."),
    video: bool = typer.Option(True, "--video/--no-video", help="Write each run's turntable video."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Score each embedded-world prompt's asset with the "
                                  "judge (DIR/<slug>/eval.json)."),
):
    """Generate one asset per prompt of PROMPTS.txt, side by side on Ray; a rerun skips finished runs and resumes the
    others (needs the ray extra of text3d, see docs/batch.md)."""
    from text3d.batch.runner import BatchFailures, BatchSettings, describe, failures, run_batch

    flags = [f"{key}={value}" for key, value in (("guidance", guidance), ("teacher.name_or_path", teacher),
                                                 ("train.steps", steps), ("seed", seed)) if value is not None]
    if stages is not None:
        flags.append(f"stages=[{stages}]")
    settings = BatchSettings(prompts_file=prompts_file, out=out, overrides=flags + list(overrides or []),
                             config_files=list(config or []), guidance=guidance, workers=workers, threads=threads,
                             address=address, video=video, score=evaluate)
    result = run_batch(settings, echo=lambda line: typer.echo(line, err=True))
    typer.echo(describe(result))
    failed = failures(result)
    if failed:
        for line in failed:
            typer.echo(f"  failed: {line}", err=True)
        raise BatchFailures(f"{len(failed)} of {len(result.records)} prompts failed (see {result.out / 'results.csv'})")
