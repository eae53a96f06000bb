"""`text3d eval run`: score the exported mesh of a `text3d generate` run against the embedded world.

The run's exported mesh (.glb, else .obj) is rendered with the project's mesh rasteriser from 8 fixed
views (azimuth 0, 45, ..., 315 degrees at the preview elevation, lambertian with the light at the
camera, white background, 64x64 like the world's renders). For each view the judge predicts object,
colour and view label; the ground-truth object of the prompt is rendered by the toyworld at the same
cameras to compute the silhouette IoU. For objects with a distinct front and back, the Janus rate is
the fraction of clear front or back views (at least 10 degrees inside the label's azimuth range) whose
predicted view label is the opposite one (a back seen as a front, or a front seen as a back), counted over
the clear views the judge reads right on the ground truth's own render: the embedded judge calls the back of
the true snowman a front in 7 of 9 colours and of the true car in 4 of 9 (2026-12-04,
``scripts/judge_truth_views.py``), and a view the instrument misreads on the truth cannot tell a Janus asset
from a right one. ``janus_rate_all_views`` is the rate over every clear view, ``janus_truth_misreads`` the
number left out.
The mesh is also compared with the object's SDF in 3D by :func:`text3d.eval.geometry.geometry_scores`
(volumetric IoU, Chamfer distance and top-view IoU, after bounding-box normalisation and the best yaw).

With a CLIP model (``--clip``) the same 8 views, rendered at 224x224, also get DreamFusion's CLIP R-precision
against distractor prompts (the world's other captions for its prompts, else ``text3d/assets/eval/clip_prompts.txt``);
a prompt outside the embedded world (a real-SD run) is then scored by CLIP alone, the judge figures None.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from text3d.cameras import CameraSamplerConfig, orbit_cameras, view_label
from text3d.errors import UserError
from text3d.eval.clip_rprecision import DEFAULT_CLIP_PROMPTS, ClipScorer, load_clip
from text3d.eval.judge import Judge
from text3d.eval.score_images import load_judge, pct, score_predictions
from text3d.runtime.atomic import atomic_write_text
from text3d.utils.masks import silhouette_iou

EVAL_NAME = "eval.json"
N_VIEWS = 8
RESOLUTION = 64
CLIP_RESOLUTION = 224
OPPOSITE = {"front": "back", "back": "front"}


def find_mesh(run_dir: Path, run_name: str) -> Path:
    for suffix in (".glb", ".obj"):
        path = run_dir / f"{run_name}{suffix}"
        if path.is_file():
            return path
    raise UserError(f"{run_dir} has no exported mesh ({run_name}.glb or .obj); run text3d export {run_dir}")


def clear_front_back(elevation: float, azimuth: float, cfg: CameraSamplerConfig, margin: float = 10.0) -> str | None:
    """'front' or 'back' when the camera is at least ``margin`` degrees inside that label's range."""
    label = view_label(elevation, azimuth, cfg)
    az = abs((azimuth + 180.0) % 360.0 - 180.0)
    if label == "front" and az <= cfg.front_half_angle - margin:
        return "front"
    if label == "back" and az >= 180.0 - cfg.back_half_angle + margin:
        return "back"
    return None


def clear_views(cams, cfg: CameraSamplerConfig) -> list[tuple[int, str]]:
    """(index, 'front' | 'back') of each of ``cams`` that is a clear front or back view (:func:`clear_front_back`)."""
    labels = [(i, clear_front_back(float(e), float(a), cfg))
              for i, (e, a) in enumerate(zip(cams.elevation.tolist(), cams.azimuth.tolist()))]
    return [(i, label) for i, label in labels if label is not None]


def colour_saturation(rgb: torch.Tensor, opacity: torch.Tensor) -> float:
    """Mean HSV saturation (max - min) / max over the object's pixels (opacity > 0.5) of [B, 3, H, W] views."""
    hi, lo = rgb.amax(dim=1), rgb.amin(dim=1)
    sat = (hi - lo) / hi.clamp_min(1e-6)
    mask = opacity[:, 0] > 0.5
    return float(sat[mask].mean()) if bool(mask.any()) else 0.0


def render_views(mesh_path: Path, cfg, resolution: int) -> dict:
    """The mesh from the N_VIEWS orbit cameras (lambertian, light at the camera, white background): render_mesh's
    rgb / opacity / depth / normal plus ``cams`` and their view ``labels``."""
    from text3d.renderers.mesh import MeshAsset, render_mesh

    cams = orbit_cameras(cfg.camera, N_VIEWS)
    with torch.no_grad():
        views = render_mesh(MeshAsset.load(mesh_path), cams, resolution, resolution, shading="lambertian")
    return {"cams": cams, "labels": cams.view_labels(cfg.camera), **views}


def mesh_geometry(mesh_path: Path, object_name: str) -> dict:
    """:func:`~text3d.eval.geometry.geometry_scores` of the exported mesh against the world's object (None figures
    and the reason for a mesh with no surface, so the judge's figures are still written)."""
    import trimesh

    from text3d.eval.geometry import geometry_scores
    from text3d.toyworld.catalog import OBJECTS

    mesh = trimesh.load(str(mesh_path), force="mesh")
    try:
        return geometry_scores(np.asarray(mesh.vertices), np.asarray(mesh.faces), OBJECTS[object_name].sdf)
    except UserError as e:
        return {"volume_iou": None, "chamfer": None, "top_iou": None, "top_hole": None, "geometry_error": str(e)}


def score_mesh(mesh_path: Path, cfg, judge: Judge) -> tuple[dict, dict]:
    """(scores, views) of one exported mesh against the prompt's ground-truth object."""
    from text3d.toyworld.catalog import FRONT_BACK_OBJECTS, parse_caption
    from text3d.toyworld.render import render_objects

    obj, colour = parse_caption(cfg.prompt)
    mesh_views = render_views(mesh_path, cfg, RESOLUTION)
    cams, labels = mesh_views["cams"], mesh_views["labels"]
    with torch.no_grad():
        truth = render_objects([obj] * N_VIEWS, [colour] * N_VIEWS, cams, resolution=RESOLUTION)
    scores = score_predictions(judge, mesh_views["rgb"], [obj] * N_VIEWS, [colour] * N_VIEWS, labels)
    ious = silhouette_iou(mesh_views["opacity"], truth["mask"])
    result = {"mesh": mesh_path.name, "object_accuracy": scores["object_accuracy"],
              "colour_accuracy": scores["colour_accuracy"], "view_accuracy": scores["view_accuracy"],
              "silhouette_iou": float(np.mean(ious)), "silhouette_iou_per_view": ious,
              "saturation": colour_saturation(mesh_views["rgb"], mesh_views["opacity"]),
              "predicted": scores["predicted"], "janus_rate": None, **mesh_geometry(mesh_path, obj)}
    if obj in FRONT_BACK_OBJECTS:
        clear = clear_views(cams, cfg.camera)
        truth_views = score_predictions(judge, truth["rgb"], [obj] * N_VIEWS, [colour] * N_VIEWS,
                                        labels)["predicted"]["view"]
        flips = {i: scores["predicted"]["view"][i] == OPPOSITE[lab] for i, lab in clear}
        readable = [flips[i] for i, lab in clear if truth_views[i] == lab]  # the judge reads the truth right here
        result["janus_rate"] = float(np.mean(readable)) if readable else None
        result["janus_views"] = len(readable)
        result["janus_rate_all_views"] = float(np.mean(list(flips.values()))) if flips else None
        result["janus_truth_misreads"] = len(clear) - len(readable)
    return result, mesh_views


def particle_diversity(views: list[dict]) -> dict:
    """Mean over particle pairs of the RGB RMS difference of the same views, and of 1 - silhouette IoU."""
    rms, disagreement = [], []
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            rms.append(float((views[i]["rgb"] - views[j]["rgb"]).pow(2).mean().sqrt()))
            disagreement.append(1.0 - float(np.mean(silhouette_iou(views[i]["opacity"], views[j]["opacity"]))))
    if not rms:
        return {"rgb_rms": None, "silhouette_disagreement": None}
    return {"rgb_rms": float(np.mean(rms)), "silhouette_disagreement": float(np.mean(disagreement))}


MEAN_KEYS = ("object_accuracy", "colour_accuracy", "view_accuracy", "silhouette_iou", "saturation", "janus_rate",
             "janus_rate_all_views", "clip_r_precision", "volume_iou", "chamfer", "top_iou", "top_hole")


def clip_distractors(parsed: tuple[str, str] | None, prompts_file: str | Path | None = None) -> list[str]:
    """Distractor prompts: ``prompts_file``, else the world's captions for a world prompt (``parsed``), else
    text3d/assets/eval/clip_prompts.txt; for a world prompt, captions of the same object and colour are dropped."""
    from text3d.prompts import read_prompts_file
    from text3d.toyworld.catalog import all_captions, parse_caption

    if prompts_file is not None:
        prompts = read_prompts_file(Path(prompts_file))
    else:
        prompts = all_captions() if parsed is not None else read_prompts_file(DEFAULT_CLIP_PROMPTS)
    return [p for p in prompts if parsed is None or parse_caption(p) != parsed]


def score_run(run_dir: str | Path, judge: Judge | str | Path | None = None, write: bool = True,
              clip: ClipScorer | str | Path | None = None, clip_prompts: str | Path | None = None) -> dict:
    """Scores of every particle of a run (the top-level figures are means over particles).

    ``clip`` (a :class:`ClipScorer`, or a CLIP folder or hub id) adds CLIP R-precision against the distractors
    of :func:`clip_distractors`; without it the prompt must be an embedded-world caption."""
    from text3d.toyworld.catalog import parse_caption
    from text3d.generate.finalize import particle_dir
    from text3d.generate.run import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    parsed = parse_caption(cfg.prompt)
    if parsed is None and clip is None:
        raise UserError(f"the run's prompt {cfg.prompt!r} is not an embedded-world caption ('a <colour> <object>', "
                        f"see text3d toyworld list), so the judge cannot score it; score it by CLIP R-precision "
                        f"with --clip MODEL (a CLIP folder or hub id)")
    distractors = clip_distractors(parsed, clip_prompts) if clip is not None else []
    if clip is not None and not isinstance(clip, ClipScorer):
        clip = load_clip(clip)
    judge = load_judge(judge) if parsed is not None else None
    count = cfg.train.particles
    per_particle, views = [], []
    for i in range(count):
        mesh = find_mesh(particle_dir(run_dir, i, count), cfg.run_name)
        result, rendered = score_mesh(mesh, cfg, judge) if judge is not None else ({"mesh": mesh.name}, None)
        if clip is not None:
            clip_views = render_views(mesh, cfg, CLIP_RESOLUTION)
            result.update(clip.r_precision(clip_views["rgb"], cfg.prompt, distractors))
            if rendered is None:  # diversity from the judge's 64 px views when there are any
                rendered = clip_views
        per_particle.append(result)
        views.append(rendered)
    result = {"prompt": cfg.prompt, "object": parsed[0] if parsed else None,
              "colour": parsed[1] if parsed else None, "views": N_VIEWS,
              "guidance": cfg.guidance, "azimuths": views[0]["cams"].azimuth.tolist(),
              "camera_view_labels": views[0]["labels"], "particles": count}
    if clip is not None:
        result.update({"clip_model": clip.source, "clip_n_prompts": per_particle[0]["clip_n_prompts"],
                       "clip_resolution": CLIP_RESOLUTION})
    for key in MEAN_KEYS:
        values = [r[key] for r in per_particle if r.get(key) is not None]
        result[key] = float(np.mean(values)) if values else None
    if count == 1:
        result.update({k: v for k, v in per_particle[0].items() if k not in result})
    else:
        result["per_particle"] = per_particle
        result["diversity"] = particle_diversity(views)
    if write:
        atomic_write_text(run_dir / EVAL_NAME, json.dumps(result, indent=2) + "\n")
    return result


def format_run_scores(result: dict) -> list[str]:
    """Human-readable summary lines of a :func:`score_run` result."""
    lines = []
    if result.get("silhouette_iou") is not None:
        lines.append(f"{result['prompt']!r}: object {pct(result['object_accuracy'])}, colour "
                     f"{pct(result['colour_accuracy'])}, view {pct(result['view_accuracy'])}, silhouette IoU "
                     f"{result['silhouette_iou']:.3f}, saturation {result['saturation']:.2f}")
    if result.get("volume_iou") is not None:
        lines.append(f"{result['prompt']!r}: 3D against the world's {result['object']}: volume IoU "
                     f"{result['volume_iou']:.3f}, top-view IoU {result['top_iou']:.3f}, Chamfer "
                     f"{result['chamfer']:.4f} (of the bounding-box diagonal)"
                     + (f", top-view hole open {pct(result['top_hole'])}" if result.get("top_hole") is not None else ""))
    if result.get("clip_r_precision") is not None:
        lines.append(f"{result['prompt']!r}: CLIP R-precision {pct(result['clip_r_precision'])} over {result['views']} "
                     f"views, top-1 among {result['clip_n_prompts']} prompts ({result['clip_model']})")
    if result.get("janus_rate") is not None:
        views = result.get("janus_views")
        misread = result.get("janus_truth_misreads") or 0
        lines.append(f"Janus rate {pct(result['janus_rate'])}" + (f" over {views} clear front/back views" if views else "")
                     + (f" ({misread} more the judge misreads on the truth itself: {pct(result['janus_rate_all_views'])}"
                        f" over all)" if misread else ""))
    if result.get("diversity") and result["diversity"]["rgb_rms"] is not None:
        d = result["diversity"]
        lines.append(f"{result['particles']} particles: diversity RGB RMS {d['rgb_rms']:.3f}, silhouette disagreement "
                     f"{d['silhouette_disagreement']:.3f}")
    return lines
