"""Score generated images with the judge: does each image show the object, colour and view its prompt names?

* :func:`parse_prompt` turns "a red cube, side view" into ("cube", "red", "side") using
  ``text3d.toyworld.catalog.parse_caption`` when that module exists, else a fallback parser over the
  judge's label names ("a|an|the {colour} {object}[, {view} view]").
* :func:`score_predictions` (reusable by any evaluation: sampled images, renders of exported meshes)
  gives per-head accuracies against expected labels; ``None`` expectations are not scored (a prompt
  without a view suffix does not count towards view accuracy).
* :func:`score_folder` reads a ``text3d sample`` folder (``prompts.json``), scores it, and writes
  ``scores.json``. Given a reference (a toyworld dataset) it adds the Fréchet distance of the judge's
  features against its ground-truth renders, and the judge's own view accuracy on them: the ceiling that a
  sample's view accuracy is read against.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from text3d.errors import UserError
from text3d.eval.judge import HEADS, Judge
from text3d.runtime.resources import package_path

DEFAULT_JUDGE_DIR = package_path("assets", "judge")
SCORES_NAME = "scores.json"
MAX_REFERENCE = 10000  # reference renders used for the Fréchet distance (a seeded subset beyond that)


# ---------------------------------------------------------------------- prompts


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split())


def split_view(prompt: str, view_labels: Sequence[str]) -> tuple[str, str | None]:
    """("a red cube", "side") from "a red cube, side view"; (prompt, None) without a known view suffix."""
    text = " ".join(prompt.split())
    for label in sorted(view_labels, key=len, reverse=True):
        m = re.search(rf",?\s*\b{re.escape(_norm(label))}\s+view\s*\.?\s*$", text, flags=re.IGNORECASE)
        if m:
            return text[:m.start()].strip(), label
    return text, None


def _catalog_parser():
    try:
        from text3d.toyworld.catalog import parse_caption
    except Exception:  # not there yet, or broken: use the fallback
        return None
    return parse_caption


def fallback_parse(base: str, objects: Sequence[str], colours: Sequence[str]) -> tuple[str, str] | None:
    """(object, colour) names from "a {colour} {object}" by exact match over the label names."""
    text = _norm(base).rstrip(".")
    text = re.sub(r"^(a|an|the)\s+", "", text)
    for colour in sorted(colours, key=len, reverse=True):
        c = _norm(colour)
        if text.startswith(c + " "):
            rest = text[len(c) + 1:].strip()
            for obj in objects:
                if rest == _norm(obj):
                    return obj, colour
    return None


def parse_prompt(prompt: str, objects: Sequence[str], colours: Sequence[str],
                 view_labels: Sequence[str]) -> tuple[str | None, str | None, str | None]:
    """(object, colour, view label) names from a toyworld-style prompt; None where not recognised.

    The names returned are always among ``objects`` / ``colours`` / ``view_labels``.
    """
    base, view = split_view(prompt, view_labels)
    parsed = None
    parser = _catalog_parser()
    if parser is not None:
        for text in (prompt, base):
            try:
                parsed = parser(text)
            except Exception:
                parsed = None
            if parsed is not None:
                obj, colour = parsed
                obj = next((o for o in objects if _norm(o) == _norm(str(obj))), None)
                colour = next((c for c in colours if _norm(c) == _norm(str(colour))), None)
                parsed = (obj, colour) if obj is not None and colour is not None else None
            if parsed is not None:
                break
    if parsed is None:
        parsed = fallback_parse(base, objects, colours)
    obj, colour = parsed if parsed is not None else (None, None)
    return obj, colour, view


# ---------------------------------------------------------------------- scoring


def _expected_index(judge: Judge, head: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        if not 0 <= int(value) < len(judge.labels[head]):
            raise ValueError(f"{head} index {value} is outside the judge's {len(judge.labels[head])} labels")
        return int(value)
    index = judge.index(head, str(value))
    if index is None:
        index = next((i for i, n in enumerate(judge.labels[head]) if _norm(n) == _norm(str(value))), None)
    if index is None:
        raise ValueError(f"the judge knows no {head} called {value!r}")
    return index


def score_predictions(judge: Judge, images: torch.Tensor, expected_objects: Sequence, expected_colours: Sequence,
                      expected_views: Sequence | None = None, batch_size: int = 256,
                      outputs: dict | None = None) -> dict:
    """Per-head accuracy of the judge's predictions on ``images`` [N, 3, H, W] in [0, 1].

    Expectations are label names or indices, one per image; ``None`` entries (or ``expected_views=None``)
    are not scored. ``outputs`` may be a ready :meth:`Judge.run` result for these images.
    Returns {"n", "{head}_accuracy", "n_{head}", "joint_accuracy" (object and colour both right),
    "predicted": {head: [names]}, "correct": {head: [bool|None]}}; an accuracy with nothing to
    score is None.
    """
    n = len(images) if outputs is None else len(outputs["object"])
    expected = {"object": list(expected_objects), "colour": list(expected_colours),
                "view": list(expected_views) if expected_views is not None else [None] * n}
    for head, values in expected.items():
        if len(values) != n:
            raise ValueError(f"{len(values)} expected {head} labels for {n} images")
    if outputs is None:
        outputs = judge.run(images, batch_size=batch_size)
    result: dict = {"n": n, "predicted": {}, "correct": {}}
    for head in HEADS:
        pred = outputs[head].tolist()
        want = [_expected_index(judge, head, v) for v in expected[head]]
        correct = [None if w is None else bool(p == w) for p, w in zip(pred, want)]
        scored = [c for c in correct if c is not None]
        result[f"{head}_accuracy"] = float(np.mean(scored)) if scored else None
        result[f"n_{head}"] = len(scored)
        result["predicted"][head] = [judge.labels[head][p] for p in pred]
        result["correct"][head] = correct
    both = [a and b for a, b in zip(result["correct"]["object"], result["correct"]["colour"])
            if a is not None and b is not None]
    result["joint_accuracy"] = float(np.mean(both)) if both else None
    return result


def front_back_view_accuracy(view_correct: Sequence[bool | None], objects: Sequence[str | None]) -> dict:
    """View accuracy on the images of objects with a distinct front and back (snowman, house, mug, car):
    {"view_accuracy_front_back", "n_view_front_back"}. On a sphere or a cube the front, side and back
    views look alike, so only these images show whether a model follows the view suffix."""
    try:
        from text3d.toyworld.catalog import FRONT_BACK_OBJECTS
    except Exception:  # no toyworld: nothing to single out
        FRONT_BACK_OBJECTS = []
    scored = [c for c, o in zip(view_correct, objects) if c is not None and o in FRONT_BACK_OBJECTS]
    return {"view_accuracy_front_back": float(np.mean(scored)) if scored else None, "n_view_front_back": len(scored)}


# ---------------------------------------------------------------------- folders


def load_judge(judge: Judge | str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
    """A Judge as given, or loaded from a folder (default ``text3d/assets/judge``), with a one-line error."""
    if isinstance(judge, Judge):
        return judge
    folder = Path(judge) if judge is not None else DEFAULT_JUDGE_DIR
    if not folder.is_dir():
        hint = "the default judge is not trained yet" if judge is None else "no such folder"
        raise UserError(f"judge folder {folder} not found ({hint}): train one with "
                        f"python scripts/train_judge.py --data DATASET --out {folder}, or pass --judge DIR")
    return Judge.load(folder, device)


def read_sample_folder(folder: str | Path) -> tuple[list[dict], torch.Tensor]:
    """The records of ``folder/prompts.json`` and their images [N, 3, H, W] in [0, 1]."""
    from PIL import Image

    folder = Path(folder)
    path = folder / "prompts.json"
    if not path.is_file():
        raise UserError(f"{folder} has no prompts.json; make a folder of samples with text3d sample PROMPT --out "
                        f"{folder}")
    try:
        records = json.loads(path.read_text())["images"]
        files = [(str(r["file"]), str(r["prompt"])) for r in records]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a text3d sample record ({type(exc).__name__}: {exc})") from None
    if not files:
        raise UserError(f"{path} lists no images")
    images = []
    for name, _ in files:
        try:
            with Image.open(folder / name) as im:
                array = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise UserError(f"image {folder / name} listed in prompts.json cannot be read ({exc})") from None
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise UserError(f"images in {folder} have different sizes: {sorted(sizes)}")
    return records, torch.stack(images).float() / 255.0


def reference_outputs(judge: Judge, reference: str | Path, max_images: int = MAX_REFERENCE, seed: int = 0) -> dict:
    """The judge on a toyworld dataset's ground-truth renders (a seeded subset of ``max_images``):
    {"features" [N, D], "n", "view_accuracy", "view_accuracy_front_back", "n_view_front_back"}.

    The two view accuracies are the judge's own ceiling for a generator's view figures: on ground truth
    it still mistakes some views (a sphere's front and back are one image), so a sample's view accuracy
    is read against these."""
    from text3d.toyworld.dataset import ToyworldDataset

    data = ToyworldDataset.load(reference)
    n = len(data)
    if n < 2:
        raise UserError(f"reference dataset {reference} has {n} image(s); the Fréchet distance needs at least 2")
    selected = np.arange(n)
    if n > max_images:
        selected = np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))
    feats, views = [], []
    for i in range(0, len(selected), 1024):
        out = judge.run(data.images(selected[i:i + 1024]))
        feats.append(out["features"])
        views.append(out["view"])
    predicted = [judge.labels["view"][k] for k in torch.cat(views).tolist()]
    truth = [data.view_labels[k] for k in data.arrays["view"][selected].tolist()]
    objects = [data.objects[k] for k in data.arrays["object"][selected].tolist()]
    correct = [p == t for p, t in zip(predicted, truth)]
    return {"features": torch.cat(feats), "n": len(selected), "view_accuracy": float(np.mean(correct)),
            **front_back_view_accuracy(correct, objects)}


def score_folder(folder: str | Path, judge: Judge | str | Path | None = None, reference: str | Path | None = None,
                 device: str | torch.device = "cpu", write: bool = True, max_reference: int = MAX_REFERENCE) -> dict:
    """Score a ``text3d sample`` folder; writes ``folder/scores.json`` (unless ``write=False``) and returns it."""
    from text3d.eval.frechet import frechet_distance_features
    from text3d.runtime.atomic import atomic_write_text

    folder = Path(folder)
    records, images = read_sample_folder(folder)
    judge_obj = load_judge(judge, device)
    labels = judge_obj.labels
    parsed = [parse_prompt(r["prompt"], labels["object"], labels["colour"], labels["view"]) for r in records]
    unparsed = sorted({r["prompt"] for r, p in zip(records, parsed) if p[0] is None})
    if len(unparsed) == len(records):
        raise UserError(f"no prompt in {folder / 'prompts.json'} names an object and colour the judge knows "
                        f"(e.g. {records[0]['prompt']!r}); expected prompts like 'a {labels['colour'][0]} "
                        f"{labels['object'][0]}, front view'")
    outputs = judge_obj.run(images)
    scores = score_predictions(judge_obj, images, [p[0] for p in parsed], [p[1] for p in parsed],
                               [p[2] if p[0] is not None else None for p in parsed], outputs=outputs)
    result = {
        "folder": str(folder),
        "judge": str(judge if isinstance(judge, (str, Path)) else DEFAULT_JUDGE_DIR if judge is None else "<object>"),
        "n_images": len(records),
        "n_scored": len(records) - sum(p[0] is None for p in parsed),
        "unparsed_prompts": unparsed,
        **{k: scores[k] for k in ("object_accuracy", "colour_accuracy", "view_accuracy", "joint_accuracy",
                                  "n_object", "n_colour", "n_view")},
        **front_back_view_accuracy(scores["correct"]["view"], [p[0] for p in parsed]),
        "frechet_distance": None, "reference": None, "n_reference": None,
        "reference_view_accuracy": None, "reference_view_accuracy_front_back": None,
    }
    if reference is not None:
        if len(images) < 2:
            raise UserError("the Fréchet distance needs at least 2 images; sample more (-n)")
        ref = reference_outputs(judge_obj, reference, max_reference)
        result.update(frechet_distance=frechet_distance_features(outputs["features"], ref["features"]),
                      reference=str(reference), n_reference=ref["n"],
                      reference_view_accuracy=ref["view_accuracy"],
                      reference_view_accuracy_front_back=ref["view_accuracy_front_back"])
    result["per_image"] = [
        {"file": r["file"], "prompt": r["prompt"],
         "expected": {"object": p[0], "colour": p[1], "view": p[2] if p[0] is not None else None},
         "predicted": {h: scores["predicted"][h][i] for h in HEADS},
         "confidence": {h: round(float(outputs[f"{h}_probs"][i].max()), 4) for h in HEADS}}
        for i, (r, p) in enumerate(zip(records, parsed))]
    if write:
        atomic_write_text(folder / SCORES_NAME, json.dumps(result, indent=2) + "\n")
    return result


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal ("n/a" for None), as the eval summaries print it."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_scores(result: dict) -> list[str]:
    """Human-readable summary lines of a :func:`score_folder` result."""
    lines = [f"images scored   {result['n_scored']} of {result['n_images']}",
             f"object accuracy {pct(result['object_accuracy'])} ({result['n_object']})",
             f"colour accuracy {pct(result['colour_accuracy'])} ({result['n_colour']})",
             f"view accuracy   {pct(result['view_accuracy'])} ({result['n_view']} with a view suffix)",
             f"  front/back    {pct(result.get('view_accuracy_front_back'))} "
             f"({result.get('n_view_front_back', 0)} of objects with a distinct front and back)",
             f"object+colour   {pct(result['joint_accuracy'])}"]
    if result.get("frechet_distance") is not None:
        lines.append(f"Fréchet dist.   {result['frechet_distance']:.4g} (vs {result['n_reference']} renders of "
                     f"{result['reference']})")
        lines.append(f"judge's own view accuracy on those renders: {pct(result['reference_view_accuracy'])} "
                     f"(all), {pct(result['reference_view_accuracy_front_back'])} (front/back objects)")
    if result["unparsed_prompts"]:
        shown = ", ".join(repr(p) for p in result["unparsed_prompts"][:3])
        lines.append(f"not scored: {len(result['unparsed_prompts'])} prompt(s) the judge cannot parse, e.g. {shown}")
    return lines
