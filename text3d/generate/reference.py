"""A front view drawn by the teacher itself, pinned in a mesh stage (DreamCraft3D / Magic123's reference view).

The teacher samples the prompt's front view once, from the camera ``c_ref = (reference_elevation, azimuth 0,
camera.eval_radius, camera.eval_fovy)`` (``reference_steps`` DDIM steps at ``reference_guidance_scale``, seeded
by the run's seed; a view-aware teacher sees ``c_ref``, every teacher gets the view-suffixed prompt). With
``reference_negative_back`` the unconditional branch of that CFG,

    eps = eps(x, y_back) + s (eps(x, y_front) - eps(x, y_back)),

is the prompt's back view ``y_back`` (joined with ``prompts.negative``) instead of the empty prompt: the sample is
pushed away from what the teacher draws for the back, and what tells a front from a back comes out stronger (the
embedded teacher's front of a red car gets two white lights instead of faint orange ones, a snowman an orange
nose). Every step
of the stage then adds

    L_ref = 0.5 * w * sum_pixels  m * O * || render(c_ref + d) - I_ref ||^2

to the guidance's loss: ``d`` draws the camera's elevation and azimuth uniformly within ``+-reference_jitter``
degrees (the reference cannot be met by colouring the rays of one camera, which the 64 px hash-grid NeRF did), the
render is lambertian with the light at the camera, ``O`` is the render's opacity (not differentiated) and ``m`` the
reference's foreground: 1 except on the near-white region connected to the image's border
(:func:`reference_foreground`, less a 2-pixel band along the object's edge), so white inside the object (a car's
lights) is kept and neither the reference's background nor its antialiased edge is painted onto the surface. In
the texture stage the geometry is frozen, so the reference can only colour the surface: what the judge and the bake
then see (docs/guidance.md, 2026-12-07, session 27).

With ``reference_back`` the teacher's back view (azimuth 180, the next seed's noise) is pinned as well, with the
same weight and jitter; with ``reference_negative_back`` its CFG is pushed away from the prompt's *front* view, so
that what a back has (a house's chimney, no door) comes out and a front's features do not: each step adds one
render of each pinned camera.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from text3d.cameras import jittered_light_dirs, spherical_cameras
from text3d.errors import CheckpointError
from text3d.prompts import prompts_for_cameras, view_prompt


def reference_foreground(image: torch.Tensor, white: float = 0.92, erode: int = 2) -> torch.Tensor:
    """[B, 1, H, W]: 0 on the background (pixels whose channels all exceed ``white`` and that connect to the image's
    border through such pixels: a flood fill by repeated 3x3 dilation) and on the ``erode`` pixels next to it, 1
    elsewhere. The eroded band is the object's antialiased edge, half background: from the front it covers the
    surface seen at a grazing angle, which it would paint pale (white streaks along the sides, seen from the side)."""
    near_white = (image.min(dim=1, keepdim=True).values > white).to(image.dtype)
    reached = torch.zeros_like(near_white)
    reached[..., 0, :] = reached[..., -1, :] = reached[..., :, 0] = reached[..., :, -1] = 1.0
    reached = reached * near_white
    for _ in range(sum(image.shape[-2:])):
        grown = F.max_pool2d(reached, 3, stride=1, padding=1) * near_white
        if torch.equal(grown, reached):
            break
        reached = grown
    if erode > 0:
        reached = F.max_pool2d(reached, 2 * erode + 1, stride=1, padding=erode)
    return 1.0 - reached


OPPOSITE = {"front": "back", "back": "front"}


def reference_views(stage_cfg) -> list[tuple[float, str]]:
    """(azimuth, view label) of each pinned view: the front, and the back with ``reference_back``."""
    return [(0.0, "front")] + ([(180.0, "back")] if stage_cfg.reference_back else [])


def reference_negative(cfg, stage_cfg, view: str = "front") -> str:
    """The negative prompt of the ``view`` reference's sample: ``prompts.negative``, led by the prompt's opposite
    view (the back for the front, the front for the back) with ``reference_negative_back`` (the view suffix is
    added whether or not the run's prompts are view-dependent)."""
    if not stage_cfg.reference_negative_back:
        return cfg.prompts.negative
    opposite = view_prompt(cfg.prompt, OPPOSITE[view])
    return f"{opposite}, {cfg.prompts.negative}" if cfg.prompts.negative else opposite


class ReferenceView:
    """The reference images of a run and their loss (module docstring). ``image`` [N, 3, H, W] in [0, 1], one per
    azimuth of ``azimuths`` (the front, then the back with ``reference_back``)."""

    def __init__(self, image: torch.Tensor, elevation: float, radius: float, fovy: float, weight: float,
                 jitter: float, azimuths: tuple[float, ...] = (0.0,)):
        if image.shape[0] != len(azimuths):
            raise ValueError(f"{image.shape[0]} reference images for {len(azimuths)} azimuths")
        self.image, self.foreground = image, reference_foreground(image)
        self.elevation, self.radius, self.fovy = elevation, radius, fovy
        self.weight, self.jitter, self.azimuths = weight, jitter, tuple(azimuths)

    @classmethod
    def sample(cls, teacher, cfg, stage_cfg, device: torch.device) -> "ReferenceView":
        """The teacher's sample of each of ``cfg.prompt``'s pinned views (the global RNG left as it was; the front's
        noise is the run's seed's, the back's the next seed's)."""
        from text3d.teacher.sampling import sample_images

        images = []
        for i, (azimuth, view) in enumerate(reference_views(stage_cfg)):
            cams = spherical_cameras(stage_cfg.reference_elevation, azimuth, cfg.camera.eval_radius,
                                     cfg.camera.eval_fovy)
            prompt = prompts_for_cameras(cfg.prompt, cams, cfg.prompts, cfg.camera)
            generator = torch.Generator().manual_seed(cfg.seed + i)
            with teacher.viewing(cams.to(teacher.device)):
                images.append(sample_images(teacher, prompt, steps=stage_cfg.reference_steps,
                                            guidance_scale=stage_cfg.reference_guidance_scale, generator=generator,
                                            negative=reference_negative(cfg, stage_cfg, view)))
        return cls.from_state({"image": torch.cat(images)}, cfg, stage_cfg, device)

    @classmethod
    def from_state(cls, state: dict, cfg, stage_cfg, device: torch.device) -> "ReferenceView":
        """The reference kept in a checkpoint (:meth:`state_dict`), with the run's settings: no sampling. A
        checkpoint holding another count of views than the settings pin is a :class:`CheckpointError`."""
        views = reference_views(stage_cfg)
        if state["image"].shape[0] != len(views):
            raise CheckpointError(
                f"the checkpoint's texture reference holds {state['image'].shape[0]} view(s) but the config pins "
                f"{len(views)} ({', '.join(v for _, v in views)}); resume with the run's own reference_back setting")
        return cls(state["image"].to(device, torch.float32), stage_cfg.reference_elevation, cfg.camera.eval_radius,
                   cfg.camera.eval_fovy, stage_cfg.reference_weight, stage_cfg.reference_jitter,
                   tuple(a for a, _ in views))

    def loss(self, renderer, resolution: int, ambient: float) -> torch.Tensor:
        """``L_ref`` summed over one render of each (jittered) reference camera; draws from the global RNG."""
        n = len(self.azimuths)
        d = (torch.rand(n, 2) * 2 - 1) * self.jitter
        cams = spherical_cameras(self.elevation + d[:, 0], torch.tensor(self.azimuths) + d[:, 1], self.radius,
                                 self.fovy)
        cams = cams.to(self.image.device)
        out = renderer(cams, resolution, resolution, shading="lambertian", light_dirs=jittered_light_dirs(cams, 0.0),
                       ambient=ambient)
        image, foreground = self.image, self.foreground
        if image.shape[-1] != resolution:
            image = F.interpolate(image, size=(resolution, resolution), mode="bilinear", antialias=True)
            foreground = F.interpolate(foreground, size=(resolution, resolution), mode="nearest")
        opacity = out["opacity"].detach().reshape(n, 1, resolution, resolution)
        return 0.5 * self.weight * ((out["rgb"] - image).pow(2) * foreground * opacity).sum()

    def state_dict(self) -> dict:
        return {"image": self.image}
