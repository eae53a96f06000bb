"""The Gradio page of ``text3d app``: a form for ``text3d generate``, live progress with the latest preview, the
result in a 3D viewer and its files, a stop button (Ctrl-C's path) and resume.

Jobs run one at a time (Generate and Resume share one concurrency slot; Gradio's queue tells the others their
place); Stop is outside that slot so it reaches a running job. A refused input or a failed job is a
``gr.Error``: a message in the page (and an error with that message for ``gradio_client``), never a traceback.
"""

from __future__ import annotations

import html
import json
import threading
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from text3d.app.jobs import (GUIDANCES, MAX_STEPS, INTERRUPTED, Job, JobRequest, check_request, default_stages,
                             default_steps, generate_args, latest_preview, new_run_dir, resume_args)
from text3d.errors import UserError
from text3d.runtime.run_folder import require_run_dir

STAGE_CHOICES = ("nerf,texture", "nerf", "nerf,geometry", "nerf,geometry,texture")
JOB_SLOT = "text3d-job"
VIEWER_STYLE = "width: 100%; height: 440px; background: #eef0f3; border-radius: 6px;"
EMPTY_VIEWER = "<p>the result shows here, in a 3D viewer, when a run is done</p>"


def file_url(path: Path | str) -> str:
    """The address of a file Gradio serves (``allowed_paths``), relative to the page."""
    return "gradio_api/file=" + quote(str(Path(path).resolve()))


def viewer_html(glb: str | None) -> str:
    """The result in model-viewer (the run page's viewer; its script is in the page's head)."""
    if glb is None:
        return EMPTY_VIEWER
    return (f'<model-viewer src="{html.escape(file_url(glb))}" camera-controls auto-rotate interaction-prompt="none" '
            f'shadow-intensity="1" alt="the result" style="{VIEWER_STYLE}"></model-viewer>')


class JobHolder:
    """The one running job, for the stop button."""

    def __init__(self):
        self.lock = threading.Lock()
        self.job: Job | None = None

    def set(self, job: Job | None) -> None:
        with self.lock:
            self.job = job

    def stop(self) -> bool:
        with self.lock:
            return self.job.stop() if self.job is not None else False


def result_files(run_dir: Path) -> tuple[str | None, list[str]]:
    """The run's .glb (the first particle's when there are several) and its downloadable files."""
    run_dir = Path(run_dir)
    folder = run_dir if any(run_dir.glob("*.glb")) else run_dir / "particle_0"
    glbs = sorted(folder.glob("*.glb"))
    files = [p for pattern in ("*.glb", "*.obj", "*.mtl", "*_albedo.png", "*_turntable.mp4")
             for p in sorted(folder.glob(pattern))]
    return (str(glbs[0]) if glbs else None), [str(p) for p in files]


def _read_steps(run_dir: Path) -> int | None:
    """The steps of a finished run (its run.json; every stage counted)."""
    try:
        return int(json.loads((Path(run_dir) / "run.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _checkpoint_step(run_dir) -> int | None:
    """The step of a stopped run's last checkpoint (the NeRF stage's, or the latest stage's), None without one."""
    from text3d.errors import CheckpointError
    from text3d.runtime.checkpoint import load_checkpoint

    checkpoints = sorted((Path(run_dir) / "checkpoints").glob("*.pt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        return None
    try:
        return int(load_checkpoint(checkpoints[-1])["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _status(state, stopping: bool = False) -> str:
    if state.returncode is None:
        percent = f" ({100 * state.step // state.total}%)" if state.total else ""
        head = "stopping after this step" if stopping else "training"
        return f"**{head}**: step {state.step}/{state.total or '?'}{percent}  \n`{state.line}`"
    if state.returncode == 0:
        steps = _read_steps(state.run_dir)
        return f"**done**: {steps if steps is not None else state.step} steps; run folder `{state.run_dir}`"
    if state.returncode == INTERRUPTED:
        step = _checkpoint_step(state.run_dir)  # the progress lines lag the step the child saved at
        return (f"**stopped** at step {step if step is not None else state.step}; its checkpoint is kept in "
                f"`{state.run_dir}`. "
                f"Resume continues it.")
    return f"**failed**: {state.error or state.line}"


def run_job(holder: JobHolder, args: list[str], run_dir: Path):
    """Run one child and stream (status, preview, model, files, run folder) to the page."""
    job = Job(args, run_dir)
    holder.set(job)
    try:
        for state in job.follow():
            preview = latest_preview(run_dir)
            if state.done:
                break
            yield _status(state), str(preview) if preview else None, EMPTY_VIEWER, [], str(run_dir)
    finally:
        holder.set(None)
        if job.proc.poll() is None:  # the page went away: stop the child as Ctrl-C would
            job.stop()
            job.wait()
    if state.returncode not in (0, INTERRUPTED):
        raise gr.Error(state.error or f"the job failed (exit code {state.returncode}): {state.line}",
                       print_exception=False)
    model, files = result_files(run_dir)
    preview = latest_preview(run_dir, final=True)
    yield _status(state), str(preview) if preview else None, viewer_html(model), files, str(run_dir)


def build_app(teacher: str | None, out_root: Path, holder: JobHolder | None = None) -> gr.Blocks:
    """The app's Blocks (not launched)."""
    holder = holder or JobHolder()
    out_root = Path(out_root)

    def generate(prompt, guidance, steps, seed, stages, overrides):
        try:
            req = check_request(JobRequest(prompt=prompt, guidance=guidance, steps=steps, seed=seed, stages=stages,
                                           overrides=overrides, teacher=teacher))
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        run_dir = new_run_dir(out_root, req.prompt)
        yield from run_job(holder, generate_args(req, run_dir), run_dir)

    def resume(run_dir, steps):
        try:
            folder = require_run_dir(Path(run_dir or ""))
            if steps is not None and not 1 <= int(steps) <= MAX_STEPS:
                raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        yield from run_job(holder, resume_args(folder, steps), folder)

    def stop():
        if not holder.stop():
            raise gr.Error("no job is running", print_exception=False)
        return "**stopping** after this step (its checkpoint is kept)"

    with gr.Blocks(title="text3d", analytics_enabled=False) as demo:
        gr.Markdown("# text3d\nA 3D asset from a prompt by score distillation"
                    + (f" (teacher `{teacher}`)" if teacher else " (the embedded teacher: 12 objects x 9 colours)"))
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="prompt", placeholder="a red cube", elem_id="prompt")
                guidance = gr.Radio(list(GUIDANCES), value="sds", label="guidance")
                steps = gr.Number(value=default_steps(), precision=0, label=f"NeRF steps (1-{MAX_STEPS})",
                                  elem_id="steps")
                seed = gr.Number(value=0, precision=0, label="seed")
                stages = gr.Dropdown(list(STAGE_CHOICES), value=default_stages(), label="stages",
                                     allow_custom_value=True)
                with gr.Accordion("advanced: config overrides", open=False):
                    overrides = gr.Textbox(label="key=value, one a line", lines=3, elem_id="overrides",
                                           placeholder="train.lr=0.005\nsds.guidance_scale=50")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    halt = gr.Button("Stop", variant="stop", elem_id="stop")
                    again = gr.Button("Resume", elem_id="resume")
                run_dir = gr.Textbox(label="run folder (Resume continues it)", elem_id="run_dir")
            with gr.Column(scale=3):
                status = gr.Markdown("type a prompt and press Generate", elem_id="job_status")
                preview = gr.Image(label="latest preview", type="filepath", interactive=False)
                model = gr.HTML(EMPTY_VIEWER, label="result", elem_id="model")
                files = gr.File(label="files", file_count="multiple", interactive=False)
        outputs = [status, preview, model, files, run_dir]
        go.click(generate, [prompt, guidance, steps, seed, stages, overrides], outputs, api_name="generate",
                 concurrency_id=JOB_SLOT, concurrency_limit=1)
        again.click(resume, [run_dir, steps], outputs, api_name="resume", concurrency_id=JOB_SLOT,
                    concurrency_limit=1)
        halt.click(stop, None, status, api_name="stop", concurrency_limit=None)
    return demo
