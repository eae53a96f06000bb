"""A batch's results: ``DIR/results.json`` (every run's record and the batch's settings), ``DIR/results.csv`` (one
row a prompt) and ``DIR/index.html`` (a gallery of every asset, linking each run's page where one exists, else its
.glb). All three are rewritten atomically each time a run ends, so a stopped batch leaves them complete."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from text3d.batch.task import SCORE_KEYS
from text3d.runtime.atomic import atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
GALLERY = "index.html"
STATUSES = ("done", "failed", "interrupted", "running", "waiting")
COLUMNS = ("index", "prompt", "slug", "status", "wall_seconds", "steps", "resumed_from", "attempts", "skipped",
           "glb", "preview", "page", *SCORE_KEYS, "error", "warnings")


def previous_records(out: Path) -> dict[str, dict]:
    """The records of an earlier call of the same batch, by slug (empty when there is none or it is unreadable)."""
    try:
        runs = json.loads((Path(out) / RESULTS_JSON).read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {r["slug"]: r for r in runs if isinstance(r, dict) and "slug" in r}


def counts(records: list[dict]) -> dict[str, int]:
    return {status: sum(r.get("status") == status for r in records) for status in STATUSES}


def write_results(out: Path, records: list[dict], settings: dict) -> None:
    """``results.json``, ``results.csv`` and the gallery, from ``records`` in prompt-file order."""
    out = Path(out)
    document = {**settings, "counts": counts(records), "runs": records}
    atomic_write_text(out / RESULTS_JSON, json.dumps(document, indent=2) + "\n")
    atomic_write_text(out / RESULTS_CSV, to_csv(records))
    atomic_write_text(out / GALLERY, gallery(records, settings))


def row(record: dict) -> dict:
    files, scores = record.get("files") or {}, record.get("scores") or {}
    values = {**record, "glb": files.get("glb"), "preview": files.get("preview"), "page": files.get("page"),
              **{k: scores.get(k) for k in SCORE_KEYS}}
    return {column: "" if values.get(column) is None else values[column] for column in COLUMNS}


def to_csv(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(row(record))
    return buffer.getvalue()


def _score_text(scores: dict) -> str:
    parts = []
    for key, label in (("object_accuracy", "object"), ("colour_accuracy", "colour")):
        if scores.get(key) is not None:
            parts.append(f"{label} {100 * scores[key]:.0f}%")
    if scores.get("silhouette_iou") is not None:
        parts.append(f"IoU {scores['silhouette_iou']:.2f}")
    return ", ".join(parts)


def _card(record: dict) -> str:
    files = record.get("files") or {}
    esc = html.escape
    link = files.get("page") or files.get("glb")
    image = (f'<img src="{esc(files["preview"])}" alt="{esc(record["prompt"])}">' if files.get("preview")
             else '<div class="none">no asset</div>')
    body = f'<a href="{esc(link)}">{image}</a>' if link else image
    lines = [f'<b>{esc(record["prompt"]) or "(empty prompt)"}</b>',
             f'<span class="{esc(record.get("status", ""))}">{esc(record.get("status", ""))}</span>']
    if record.get("resumed_from"):
        lines.append(f'resumed from step {record["resumed_from"]}')
    if _score_text(record.get("scores") or {}):
        lines.append(esc(_score_text(record["scores"])))
    if files.get("glb"):
        lines.append(f'<a href="{esc(files["glb"])}">.glb</a>')
    if record.get("error"):
        lines.append(f'<span class="error">{esc(record["error"])}</span>')
    return f'<div class="card">{body}<p>{"<br>".join(lines)}</p></div>'


def gallery(records: list[dict], settings: dict) -> str:
    c = counts(records)
    summary = ", ".join(f"{n} {status}" for status, n in c.items() if n)
    cards = "\n".join(_card(r) for r in records)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>text3d batch: {html.escape(str(settings.get("prompts_file", "")))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.card {{ width: 260px; border: 1px solid #ccc; border-radius: 6px; padding: 8px; }}
.card img {{ width: 100%; image-rendering: pixelated; }}
.none {{ height: 120px; background: #eee; display: flex; align-items: center; justify-content: center; }}
.failed, .error {{ color: #b00; }} .done {{ color: #070; }}
</style></head><body>
<h1>text3d batch</h1>
<p>{html.escape(summary)} &middot; <a href="{RESULTS_CSV}">{RESULTS_CSV}</a> &middot;
<a href="{RESULTS_JSON}">{RESULTS_JSON}</a></p>
<div class="grid">
{cards}
</div></body></html>
"""
