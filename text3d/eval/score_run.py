"""`text3d eval run`: score the exported mesh of a `text3d generate` run against the embedded world.

The run's exported mesh (.glb, else .obj) is rendered with the project's mesh rasteriser from 8 fixed
views (azimuth 0, 45, ..., 315 degrees at the preview elevation, lambertian with the light at the
camera, white background, 64x64 like the world's renders). For each view the judge predicts object,
colour and view label; the ground-truth object of the prompt is rendered by the toyworld at the same
cameras to compute the silhouette IoU. For objects with a distinct front and back, the Janus rate is
the fraction of clear front or back views (at least 10 degrees inside the label's azimuth range) whose
predicted view label is the opposite one (a back seen as a front, or a front seen as a back).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from text3d.cameras import CameraSamplerConfig, orbit_cameras, view_label
from text3d.errors import UserError
from text3d.eval.judge import Judge
from text3d.eval.score_images import load_judge, score_predictions
from text3d.utils.atomic import atomic_write_text

EVAL_NAME = "eval.json"
N_VIEWS = 8
RESOLUTION = 64
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


def silhouette_iou(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Per-image IoU of opacity masks [B, 1, H, W] thresholded at 0.5."""
    a, b = pred > 0.5, target > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).tolist()


def colour_saturation(rgb: torch.Tensor, opacity: torch.Tensor) -> float:
    """Mean HSV saturation (max - min) / max over the object's pixels (opacity > 0.5) of [B, 3, H, W] views."""
    hi, lo = rgb.amax(dim=1), rgb.amin(dim=1)
    sat = (hi - lo) / hi.clamp_min(1e-6)
    mask = opacity[:, 0] > 0.5
    return float(sat[mask].mean()) if bool(mask.any()) else 0.0


def score_mesh(mesh_path: Path, cfg, judge: Judge) -> tuple[dict, dict]:
    """(scores, views) of one exported mesh against the prompt's ground-truth object."""
    from text3d.renderers.mesh import MeshAsset, render_mesh
    from text3d.toyworld.catalog import FRONT_BACK_OBJECTS, parse_caption
    from text3d.toyworld.render import render_objects

    obj, colour = parse_caption(cfg.prompt)
    asset = MeshAsset.load(mesh_path)
    cams = orbit_cameras(cfg.camera, N_VIEWS)
    with torch.no_grad():
        mesh_views = render_mesh(asset, cams, RESOLUTION, RESOLUTION, shading="lambertian")
        truth = render_objects([obj] * N_VIEWS, [colour] * N_VIEWS, cams, resolution=RESOLUTION)
    labels = cams.view_labels(cfg.camera)
    scores = score_predictions(judge, mesh_views["rgb"], [obj] * N_VIEWS, [colour] * N_VIEWS, labels)
    ious = silhouette_iou(mesh_views["opacity"], truth["mask"])
    result = {"mesh": mesh_path.name, "object_accuracy": scores["object_accuracy"],
              "colour_accuracy": scores["colour_accuracy"], "view_accuracy": scores["view_accuracy"],
              "silhouette_iou": float(np.mean(ious)), "silhouette_iou_per_view": ious,
              "saturation": colour_saturation(mesh_views["rgb"], mesh_views["opacity"]),
              "predicted": scores["predicted"], "janus_rate": None}
    if obj in FRONT_BACK_OBJECTS:
        clear = [(i, clear_front_back(float(e), float(a), cfg.camera))
                 for i, (e, a) in enumerate(zip(cams.elevation.tolist(), cams.azimuth.tolist()))]
        clear = [(i, lab) for i, lab in clear if lab is not None]
        flips = [scores["predicted"]["view"][i] == OPPOSITE[lab] for i, lab in clear]
        result["janus_rate"] = float(np.mean(flips)) if flips else None
        result["janus_views"] = len(flips)
    return result, {"cams": cams, "labels": labels, **mesh_views}


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


MEAN_KEYS = ("object_accuracy", "colour_accuracy", "view_accuracy", "silhouette_iou", "saturation", "janus_rate")


def score_run(run_dir: str | Path, judge: Judge | str | Path | None = None, write: bool = True) -> dict:
    """Scores of every particle of a run (the top-level figures are means over particles)."""
    from text3d.toyworld.catalog import parse_caption
    from text3d.training.finalize import particle_dir
    from text3d.training.generate import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    parsed = parse_caption(cfg.prompt)
    if parsed is None:
        raise UserError(f"the run's prompt {cfg.prompt!r} is not an embedded-world caption ('a <colour> <object>'); "
                        f"see text3d toyworld list")
    judge = load_judge(judge)
    count = cfg.train.particles
    per_particle, views = [], []
    for i in range(count):
        result, rendered = score_mesh(find_mesh(particle_dir(run_dir, i, count), cfg.run_name), cfg, judge)
        per_particle.append(result)
        views.append(rendered)
    result = {"prompt": cfg.prompt, "object": parsed[0], "colour": parsed[1], "views": N_VIEWS,
              "guidance": cfg.guidance, "azimuths": views[0]["cams"].azimuth.tolist(),
              "camera_view_labels": views[0]["labels"], "particles": count}
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
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [f"{result['prompt']!r}: object {pct(result['object_accuracy'])}, colour {pct(result['colour_accuracy'])}, "
             f"view {pct(result['view_accuracy'])}, silhouette IoU {result['silhouette_iou']:.3f}, "
             f"saturation {result['saturation']:.2f}"]
    if result.get("janus_rate") is not None:
        views = result.get("janus_views")
        lines.append(f"Janus rate {pct(result['janus_rate'])}" + (f" over {views} clear front/back views" if views else ""))
    if result.get("diversity") and result["diversity"]["rgb_rms"] is not None:
        d = result["diversity"]
        lines.append(f"{result['particles']} particles: diversity RGB RMS {d['rgb_rms']:.3f}, silhouette disagreement "
                     f"{d['silhouette_disagreement']:.3f}")
    return lines
