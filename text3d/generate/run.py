"""`text3d generate` and `text3d export` as library calls: check inputs, load the teacher,
train (or resume), export. Every check that can fail on bad input runs before the run folder
is created, so a refused command leaves no files behind; a resume rewrites the run's files only
once its checkpoints have loaded."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from omegaconf import OmegaConf

from text3d.generate.choices import RunChoices, read_choices, write_choices
from text3d.generate.config import (STAGE_REGISTRY, RunConfig, load_config, run_config_schema, stage_checkpoint,
                                    stage_order, to_yaml)
from text3d.errors import UserError
from text3d.prompts import validate_prompt
from text3d.generate.finalize import export_run, export_stage, write_summary
from text3d.report.page import write_run_page
from text3d.runtime.run_folder import (CHECKPOINT, CONFIG_NAME, create_run_dir, default_run_dir, new_run_name,
                                        probe_writable, require_run_dir)
from text3d.generate.trainer import AssetTrainer
from text3d.runtime.atomic import atomic_write_text
from text3d.utils.backends import resolve_device
from text3d.runtime.seed import seed_everything

@dataclass
class GenerateResult:
    run_dir: Path
    steps: int
    seconds: float
    files: dict = field(default_factory=dict)


def load_teacher_for(cfg: RunConfig, device: torch.device):
    """The run's teacher: ``teacher.name_or_path``, else the embedded one (one-line error while none is installed)."""
    from text3d.teacher import load_teacher

    return load_teacher(cfg.teacher, device)


def unknown_words(teacher, prompt: str) -> list[str]:
    """Words of ``prompt`` that the embedded teacher never saw (its tokenizer has each known word as one token)."""
    from text3d.teacher.loader import DEFAULT_TEACHER_DIR

    if Path(str(getattr(teacher, "source", ""))).resolve() != DEFAULT_TEACHER_DIR.resolve():
        return []  # real SD and other teachers have open vocabularies
    words = [w.strip(".,;:!?\"'()").lower() for w in prompt.split()]
    return [w for w in words if w and not _one_token(teacher, w)]


def _one_token(teacher, word: str) -> bool:
    return len(teacher.tokenizer(word, add_special_tokens=False).input_ids) == 1


def word_hints(teacher, words: Sequence[str]) -> list[str]:
    """Each of ``words`` with the known word it most likely means, as ``ball (did you mean sphere?)``: a synonym
    from the world's table, else the closest spelling among the world's words that the teacher keeps whole."""
    from text3d.toyworld.catalog import nearest_word, vocabulary

    known = [w for w in vocabulary() if w.isalpha() and _one_token(teacher, w)]
    hints = []
    for word in words:
        near = nearest_word(word, known)
        hints.append(f"{word} (did you mean {near}?)" if near else word)
    return hints


def check_first_stage(cfg: RunConfig, from_dir: Path | None) -> None:
    """A run whose first stage continues an earlier one's particles needs ``--from`` (one-line UserError)."""
    first = STAGE_REGISTRY.get(cfg.stages[0])
    if from_dir is None and first.continues:
        stages = ",".join(cfg.stages)
        raise UserError(f"--stages {stages} needs --from RUN_DIR (a run whose earlier stages it continues), or an "
                        f"earlier stage in --stages, e.g. --stages {stage_order()[0]},{stages}")


def generate(cfg: RunConfig, out: Path | None = None, show_progress: bool = True, teacher=None,
             callbacks: Sequence[Callable] = (), video: bool = True, from_dir: Path | None = None) -> GenerateResult:
    """A new run: validates, loads the teacher, optimises, then exports. ``out`` is created, with ``config.yaml``
    and ``cli.json`` (``video`` and ``from_dir``, which ``--resume`` keeps), once the first stage is built."""
    cfg.prompt = validate_prompt(cfg.prompt)
    check_first_stage(cfg, from_dir)
    run_dir = Path(out) if out is not None else default_run_dir(cfg.prompt)
    probe_writable(run_dir)
    device = resolve_device(cfg.device)
    teacher = teacher if teacher is not None else load_teacher_for(cfg, device)
    unknown = unknown_words(teacher, cfg.prompt)
    if unknown:
        warnings.warn(f"the embedded teacher never saw the word(s) {', '.join(word_hints(teacher, unknown))}; expect "
                      f"a poor result, or pass --teacher with a real Stable Diffusion model (see text3d toyworld list "
                      f"for known words)", stacklevel=2)
    cfg.run_name = cfg.run_name or new_run_name(cfg.prompt)
    sources = _from_run(from_dir, cfg, device) if from_dir is not None else None
    choices = RunChoices(video=video, from_run=None if from_dir is None else str(Path(from_dir).resolve()))

    def start() -> None:
        create_run_dir(run_dir)
        write_run_files(run_dir, cfg, choices)

    seed_everything(cfg.seed)
    return _run_stages(cfg, teacher, device, run_dir, show_progress, callbacks, video, sources, start)


def write_run_files(run_dir: Path, cfg: RunConfig, choices: RunChoices) -> None:
    """The run's ``config.yaml`` and ``cli.json``, each written atomically."""
    atomic_write_text(Path(run_dir) / CONFIG_NAME, to_yaml(cfg))
    write_choices(run_dir, choices)


def _from_run(from_dir: Path, cfg: RunConfig, device: torch.device) -> list:
    """The particles of the last stage of ``from_dir`` that comes before this run's first stage."""
    order = stage_order()
    source_cfg = load_run_config(from_dir)
    before = [s for s in order[: order.index(cfg.stages[0])] if s in source_cfg.stages]
    if not before:
        raise UserError(f"--from {from_dir}: it ran no stage before {cfg.stages[0]} (its stages: "
                        f"{','.join(source_cfg.stages)})")
    cfg.nerf, cfg.train.particles = source_cfg.nerf, source_cfg.train.particles
    return load_stage_particles(Path(from_dir), source_cfg, device, before)


def _continued(run_dir: Path, choices: RunChoices, cfg: RunConfig, device: torch.device) -> list | None:
    """The particles that a run made with ``--from`` continues (None for a run that started from nothing)."""
    if choices.from_run is None:
        return None
    if not Path(choices.from_run).is_dir():
        raise UserError(f"{run_dir} continues the stages of {choices.from_run} (--from), which no longer exists")
    return _from_run(Path(choices.from_run), cfg, device)


def load_stage_particles(run_dir: Path, cfg: RunConfig, device: torch.device, stages: Sequence[str],
                         sources: list | None = None) -> list:
    """Rebuild ``stages`` of a run in order from their checkpoints (the first from ``sources``, the particles of
    the run it continues, if any); the particles of the last one."""
    for stage in stages:
        path = Path(run_dir) / stage_checkpoint(stage)
        if not path.is_file():
            raise UserError(f"{run_dir} has no checkpoint of its {stage} stage ({stage_checkpoint(stage)})")
        holder = AssetTrainer(cfg, None, device, Path(run_dir), show_progress=False, stage=stage, sources=sources,
                              with_guidance=False)
        holder.load()
        sources = holder.particles
    return sources


def _run_stages(cfg: RunConfig, teacher, device, run_dir: Path, show_progress: bool, callbacks, video: bool,
                sources: list | None = None, start: Callable[[], None] | None = None) -> GenerateResult:
    """Each stage in order: resume it from its checkpoint when there is one, skip it when it is finished.
    Once a stage has trained further, the checkpoints of the stages after it are stale (they continued its
    earlier particles: a resume with more ``train.steps``) and those stages start again from it.
    ``start`` (create the folder, write its config) runs once, before the first step or the export, when the
    stage to train (or every stage) has been built and its checkpoint, and those before it, have loaded."""
    begin = time.perf_counter()
    trainer = None
    step = 0
    trained = False  # an earlier stage trained in this call
    for stage in cfg.stages:
        trainer = AssetTrainer(cfg, teacher, device, run_dir, show_progress=show_progress, stage=stage,
                               sources=sources)
        if trained:
            trainer.checkpoint_path.unlink(missing_ok=True)  # stale: a crash now must not bring it back
        elif trainer.checkpoint_path.is_file():
            trainer.load()
        if not trainer.finished:
            if start is not None:
                start()
                start = None
            trainer.fit(callbacks)
            trained = True
            if stage != cfg.stages[-1] and cfg.export.stage_meshes:  # its own viewer on the run page
                export_stage(trainer.particles, trainer.cfg, trainer.device, trainer.run_dir, stage)
        step += trainer.step
        sources = trainer.particles
    if start is not None:
        start()
    seconds = time.perf_counter() - begin
    files = export_run(trainer.particles, trainer.cfg, trainer.device, trainer.run_dir, video=video)
    write_summary(trainer.run_dir, trainer.cfg, step, seconds, files)
    files["page"] = write_run_page(trainer.run_dir)  # index.html: `text3d view RUN_DIR` serves it
    return GenerateResult(trainer.run_dir, step, seconds, files)


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> RunConfig:
    run_dir = require_run_dir(run_dir)
    base = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(run_config_schema()),
                                               OmegaConf.load(run_dir / CONFIG_NAME)))
    return load_config(overrides=overrides, base=base)


def resume(run_dir: Path, overrides: Sequence[str] = (), show_progress: bool = True, teacher=None,
           callbacks: Sequence[Callable] = (), video: bool | None = None, device: str | None = None) -> GenerateResult:
    """Continue a run from ``run_dir/checkpoints/last.pt`` (overrides such as train.steps=N may extend it).

    The run's command-line choices in ``cli.json`` (the video, ``--from``) are kept; ``video`` not None
    replaces the stored one. ``config.yaml`` and ``cli.json`` are rewritten only once the checkpoints have
    loaded, so a resume that fails leaves the folder as it was."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    if device:
        cfg.device = device
    if not any((run_dir / stage_checkpoint(stage)).is_file() for stage in cfg.stages):
        raise UserError(f"{run_dir} has no checkpoint to resume from ({CHECKPOINT})")
    choices = read_choices(run_dir).given(video=video)
    torch_device = resolve_device(cfg.device)
    teacher = teacher if teacher is not None else load_teacher_for(cfg, torch_device)
    sources = _continued(run_dir, choices, cfg, torch_device)
    return _run_stages(cfg, teacher, torch_device, run_dir, show_progress, callbacks, choices.video, sources,
                       start=lambda: write_run_files(run_dir, cfg, choices))


def export_existing(run_dir: Path, formats: Sequence[str], video: bool | None = None, device: str = "cpu",
                    max_faces: Optional[int] = None) -> dict:
    """Re-export a run folder from its last checkpoint (no teacher needed); ``max_faces`` overrides the
    run's ``export.max_faces`` (decimation target, 0 = keep every face); ``video`` None: as the run chose
    (``cli.json``)."""
    cfg = load_run_config(run_dir)
    if max_faces is not None:
        cfg.export.max_faces = int(max_faces)
    run_dir = Path(run_dir)
    done = [s for s in cfg.stages if (run_dir / stage_checkpoint(s)).is_file()]
    if not done:
        raise UserError(f"{run_dir} has no checkpoint to export ({CHECKPOINT})")
    choices = read_choices(run_dir).given(video=video)
    torch_device = resolve_device(device)
    particles = load_stage_particles(run_dir, cfg, torch_device, cfg.stages[: cfg.stages.index(done[-1]) + 1],
                                     _continued(run_dir, choices, cfg, torch_device))
    files = export_run(particles, cfg, torch_device, run_dir, formats=formats, video=choices.video)
    files["page"] = write_run_page(run_dir)
    return files
