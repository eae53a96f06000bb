"""text3d's own guidance methods and stages, registered through the entry points of its ``pyproject.toml``
(groups ``text3d.guidance`` and ``text3d.stages``) exactly as a third-party package registers its own.

Guidance: ``sds`` (DreamFusion) and ``vsd`` (ProlificDreamer; ``--guidance vsd`` loads
``text3d/configs/vsd.yaml``). Stages, in order: ``nerf`` (the hash-grid NeRF; its settings are ``nerf`` and
``train``), ``geometry`` (a DMTet surface from the NeRF's density, with Laplacian and normal-consistency
regularisers) and ``texture`` (an albedo field on the frozen surface).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from text3d.errors import ConfigError, UserError
from text3d.generate.config import (GuidanceMethod, MeshStageConfig, RunConfig, StageKind, TrainConfig,
                                    check_mesh_stage_config)
from text3d.guidance import SDSConfig, SDSGuidance, VSDConfig, VSDGuidance, check_lora_config, check_score_config
from text3d.renderers.nerf import NeRFRenderer
from text3d.renderers.protocol import Renderer
from text3d.runtime.resources import CONFIG_DIR
from text3d.runtime.run_folder import CHECKPOINT


# -------------------------------------------------------------------------------------------- guidance
def _check_vsd(section: Any, name: str) -> None:
    check_score_config(section, name)
    check_lora_config(section.lora, f"{name}.lora")
    if not 0.0 <= section.sds_warmup <= 1.0:
        raise ConfigError(f"{name}.sds_warmup must be in [0, 1], got {section.sds_warmup}")
    if section.lora_interval < 1:
        raise ConfigError(f"{name}.lora_interval must be >= 1, got {section.lora_interval}")


sds = GuidanceMethod(config=SDSConfig, build=SDSGuidance, validate=check_score_config)
vsd = GuidanceMethod(config=VSDConfig, build=VSDGuidance, preset=CONFIG_DIR / "vsd.yaml", validate=_check_vsd)


# ---------------------------------------------------------------------------------------------- stages
def _sources(stage: str, sources: list[Renderer] | None) -> list[Renderer]:
    if not sources:
        raise UserError(f"the {stage} stage needs the particles of an earlier stage: run one before it, or give "
                        f"--from RUN_DIR")
    return sources


def _nerf_particles(cfg: RunConfig, device: torch.device, sources: list[Renderer] | None) -> list[Renderer]:
    """Fresh NeRFs, ``train.particles`` of them."""
    return [NeRFRenderer(cfg.nerf).to(device) for _ in range(cfg.train.particles)]


def _geometry_particles(cfg: RunConfig, device: torch.device, sources: list[Renderer] | None) -> list[Renderer]:
    """A DMTet surface per NeRF, initialised from its density."""
    from text3d.renderers.mesh_stages import GeometryStageModel

    return [GeometryStageModel(src, getattr(cfg, "geometry").grid_resolution).to(device)
            for src in _sources("geometry", sources)]


def _texture_particles(cfg: RunConfig, device: torch.device, sources: list[Renderer] | None) -> list[Renderer]:
    """The previous stage's surface (a geometry model's DMTet mesh, or a NeRF's marching-cubes mesh), frozen, with
    the field that coloured it to fine-tune."""
    from text3d.renderers.mesh_stages import TextureStageModel

    models = []
    for src in _sources("texture", sources):
        mesh = src.surface(cfg.export)
        field = src.colour_field()
        models.append(TextureStageModel(mesh.vertices, mesh.faces, field, src.background).to(device))
    return models


def _nerf_train(cfg: RunConfig) -> TrainConfig:
    return cfg.train


def _mesh_train(stage: str) -> Callable[[RunConfig], TrainConfig]:
    """``train`` with the stage's own steps/resolution/lr and no NeRF-only terms."""
    def train_config(cfg: RunConfig) -> TrainConfig:
        m = getattr(cfg, stage)
        batch = cfg.train.batch_size if m.batch_size is None else m.batch_size
        return replace(cfg.train, steps=m.steps, resolution=m.resolution, batch_size=batch, high_resolution=None,
                       lr=m.lr, lr_background=0.0, albedo_warmup=0.0, lambda_orientation=0.0, lambda_sparsity=0.0,
                       lambda_opaque=0.0)

    return train_config


def _texture_defaults() -> MeshStageConfig:
    """The ``texture`` section's defaults, their one place (``default.yaml`` runs the stage but sets none of them).

    100 steps of one 64 px view a step: on the 24-prompt table the same flips as 300 steps of two 128 px views, in
    a ninth of the time. The teacher's own front view (:mod:`text3d.generate.reference`) pinned at weight 5, its
    CFG pushed away from the prompt's back view: without the reference the cars' fronts carry no lights, without
    the push the red car's lights are faint and the snowmen have no nose (docs/guidance.md, 2026-12-07, session 28).
    """
    return MeshStageConfig(steps=100, resolution=64, batch_size=1, lr=0.005, lambda_laplacian=0.0,
                           lambda_normal_consistency=0.0, shadings=["albedo", "lambertian"], reference_weight=5.0,
                           reference_negative_back=True)


nerf = StageKind(order=0, build=_nerf_particles, train_config=_nerf_train, checkpoint=CHECKPOINT)
geometry = StageKind(order=10, config=MeshStageConfig, build=_geometry_particles, train_config=_mesh_train("geometry"),
                     regularisers={"laplacian": "lambda_laplacian", "normal_consistency": "lambda_normal_consistency"},
                     validate=check_mesh_stage_config, continues=True)
texture = StageKind(order=20, config=MeshStageConfig, default=_texture_defaults, build=_texture_particles,
                    train_config=_mesh_train("texture"), validate=check_mesh_stage_config, continues=True)
