"""The run page: ``index.html`` in a run folder, built from the files the run wrote.

It shows every exported ``.glb`` in its own ``<model-viewer>`` (the run's asset, each particle's, each stage's),
the turntable videos, the final preview and the previews (or 2D sample grids) over training, the summary (prompt,
teacher, seed, steps, wall time), the scores of ``text3d eval run`` (``eval.json``) or of a 2D student, the
training curves and the full config. The page is static and loads nothing from the network: model-viewer's
JavaScript, shipped in ``text3d/assets/web``, is copied into ``RUN/web/`` with its licences. A browser will not
load a ``.glb`` from ``file://``, so ``text3d view RUN`` serves the folder on localhost.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from text3d.report.curves import CURVES_NAME
from text3d.runtime.atomic import atomic_write_text
from text3d.runtime.resources import ASSETS_DIR

PAGE_NAME = "index.html"
WEB_DIR = "web"
VIEWER_JS = "model-viewer.min.js"
SUMMARY_NAMES = ("run.json", "summary.json")  # generate, distill2d
EVAL_NAME = "eval.json"
TIMELINE_DIRS = ("previews", "samples")
MAX_TIMELINE = 24
SUMMARY_KEYS = ("prompt", "method", "guidance", "teacher", "seed", "steps", "particles", "train_seconds",
                "train_seconds_total", "timesteps", "student")
LABELS = {"train_seconds": "wall time", "train_seconds_total": "wall time"}  # shown as minutes and seconds
VIEWER_BACKGROUND = "#eef0f3"

STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1rem 1.5rem; color: #222; }}
h1 {{ font-size: 1.5rem; margin: .2rem 0 1rem; }}
h2 {{ font-size: 1.1rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }}
.viewers {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
figure {{ margin: 0; }}
figcaption {{ font-size: .85rem; color: #555; margin-top: .25rem; }}
model-viewer {{ width: 480px; height: 480px; background: {VIEWER_BACKGROUND}; border-radius: 6px; }}
video, img.wide {{ max-width: 100%; border-radius: 6px; }}
.timeline {{ display: flex; flex-wrap: wrap; gap: .6rem; }}
.timeline img {{ max-width: 260px; }}
table {{ border-collapse: collapse; font-size: .92rem; }}
td, th {{ padding: .2rem .8rem .2rem 0; text-align: left; vertical-align: top; }}
th {{ color: #555; font-weight: 500; }}
pre {{ background: #f6f6f6; padding: .8rem; overflow-x: auto; font-size: .8rem; }}
"""


def _rel(path: Path, run_dir: Path) -> str:
    return path.relative_to(run_dir).as_posix()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    return str(value)


def _seconds(value) -> str:
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_value(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def copy_viewer(run_dir: Path) -> Path:
    """model-viewer's JavaScript and its licences in ``RUN/web/`` (skipped when already there and the same size)."""
    dest = Path(run_dir) / WEB_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for src in (ASSETS_DIR / "web").iterdir():
        if src.is_file() and src.name != "README.md":
            target = dest / src.name
            if not target.is_file() or target.stat().st_size != src.stat().st_size:
                shutil.copyfile(src, target)
    return dest / VIEWER_JS


def find_models(run_dir: Path) -> list[Path]:
    """The run's ``.glb`` files: the run folder's own, then those in its folders (``particle_i/``, ``stages/<stage>/``
    for the stages a later one continues)."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.rglob("*.glb") if not p.name.startswith(".")
             and p.relative_to(run_dir).parts[0] not in (WEB_DIR, "checkpoints")]
    return sorted(found, key=lambda p: (len(p.relative_to(run_dir).parts), p.as_posix()))


def _label(model: Path, run_dir: Path) -> str:
    where = model.parent.relative_to(run_dir).as_posix()
    return "the asset" if where == "." else where.replace("/", " / ").replace("_", " ")


def _viewers(models: list[Path], run_dir: Path, title: str) -> str:
    figures = []
    for model in models:
        label = _label(model, run_dir)
        figures.append(
            f'<figure><model-viewer src="{html.escape(_rel(model, run_dir))}" camera-controls auto-rotate '
            f'interaction-prompt="none" shadow-intensity="1" touch-action="pan-y" '
            f'alt="{html.escape(title)} ({html.escape(label)})"></model-viewer>'
            f'<figcaption>{html.escape(label)}: <a href="{html.escape(_rel(model, run_dir))}">'
            f'{html.escape(model.name)}</a></figcaption></figure>')
    return f'<h2>3D</h2><div class="viewers">{"".join(figures)}</div>'


def _videos(run_dir: Path) -> str:
    videos = sorted(run_dir.glob("*_turntable.mp4")) + sorted(run_dir.glob("*/*_turntable.mp4"))
    if not videos:
        return ""
    items = "".join(f'<figure><video src="{html.escape(_rel(v, run_dir))}" controls loop muted autoplay '
                    f'playsinline width="320"></video><figcaption>{html.escape(_label(v, run_dir))}</figcaption>'
                    f'</figure>' for v in videos)
    return f'<h2>Turntable</h2><div class="viewers">{items}</div>'


def _timeline(run_dir: Path) -> str:
    sections = []
    for name in TIMELINE_DIRS:
        images = sorted((run_dir / name).glob("*.png")) if (run_dir / name).is_dir() else []
        if len(images) > MAX_TIMELINE:  # evenly spaced, the last one kept
            images = [images[round(i * (len(images) - 1) / (MAX_TIMELINE - 1))] for i in range(MAX_TIMELINE)]
        if images:
            items = "".join(f'<figure><img src="{html.escape(_rel(p, run_dir))}" alt="{html.escape(p.stem)}">'
                            f'<figcaption>{html.escape(p.stem.replace("_", " "))}</figcaption></figure>'
                            for p in images)
            sections.append(f'<h2>{"Previews" if name == "previews" else "Samples"} over training</h2>'
                            f'<div class="timeline">{items}</div>')
    return "".join(sections)


def _scores(run_dir: Path, summary: dict) -> str:
    scores = _read_json(run_dir / EVAL_NAME) or (summary.get("scores") if isinstance(summary.get("scores"), dict)
                                                   else {})
    rows = [(k, v) for k, v in scores.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
            and v is not None and len(str(v)) < 80]
    return f"<h2>Scores</h2>{_table(rows)}" if rows else ""


def write_run_page(run_dir: Path, title: str | None = None) -> Path:
    """Write ``RUN/index.html`` (atomically) from what is in the run folder now; returns its path."""
    run_dir = Path(run_dir)
    summary = next((s for s in (_read_json(run_dir / n) for n in SUMMARY_NAMES) if s), {})
    title = title or str(summary.get("prompt") or summary.get("method") or run_dir.name)
    models = find_models(run_dir)
    head_js = ""
    if models:
        copy_viewer(run_dir)
        head_js = f'<script type="module" src="{WEB_DIR}/{VIEWER_JS}"></script>'
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if "teacher" in summary and summary["teacher"] is None:  # generate's default
        summary["teacher"] = "the embedded teacher (text3d/assets/teacher)"
    rows = [(LABELS.get(k, k), _seconds(summary[k]) if k in LABELS else summary[k]) for k in SUMMARY_KEYS
            if summary.get(k) is not None]
    if rows:
        parts.append(_table(rows))
    if models:
        parts.append(_viewers(models, run_dir, title))
    parts.append(_videos(run_dir))
    for name, heading in (("preview.png", "Preview"), ("samples/final.png", "Final samples")):
        if (run_dir / name).is_file():
            parts.append(f'<h2>{heading}</h2><img class="wide" src="{name}" alt="{heading.lower()}">')
    parts.append(_scores(run_dir, summary))
    if (run_dir / CURVES_NAME).is_file():
        parts.append(f'<h2>Training curves</h2><img class="wide" src="{CURVES_NAME}" alt="training curves">')
    parts.append(_timeline(run_dir))
    if (run_dir / "config.yaml").is_file():
        parts.append(f'<h2>Config</h2><details><summary>config.yaml</summary>'
                     f'<pre>{html.escape((run_dir / "config.yaml").read_text())}</pre></details>')
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)} - text3d</title><link rel="icon" href="data:,">'
            f'<style>{STYLE}</style>{head_js}</head>\n<body>\n' + "\n".join(p for p in parts if p)
            + "\n</body></html>\n")
    return atomic_write_text(run_dir / PAGE_NAME, page)
