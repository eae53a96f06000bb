"""Probe (not a feature): SDS plus a front view drawn by the teacher itself, pinned by a squared error.

DreamCraft3D and Magic123 anchor one view of the asset to a reference image; here the reference is the view-aware
teacher's own sample of the prompt's front view (``steps`` DDIM steps, CFG 5, seeded by the run's seed) from the
camera ``(elevation, azimuth 0, eval_radius, eval_fovy)``, and every step adds

    0.5 * weight * || render(front camera [+ jitter]) - reference ||^2

(lambertian, light at the camera) to the guidance's loss. ``--jitter D`` draws the camera's elevation and azimuth
within +-D degrees each step, so that the reference cannot be met by painting the 64 px rays of one camera. The
probe wraps the trainer's guidance and runs ``scripts/compare_guidance.py`` with the remaining arguments (one
process; split the prompts over two for two cores). Results and the reasons it is not a feature:
docs/guidance.md, 2026-12-07, session 27.

    python scripts/probe_reference_view.py --weight 5 --jitter 4 -- --methods sds --label ref5-j4 \
        --prompts CARS.txt --out /work/exp/ref --threads 1 --quiet
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weight", type=float, default=5.0)
    parser.add_argument("--elevation", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0, help="degrees of elevation and azimuth jitter")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps of the teacher's reference sample")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then compare_guidance.py's arguments")
    args = parser.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest

    import text3d.generate.trainer as trainer_module

    original_init = trainer_module.AssetTrainer.__init__

    def init(self, cfg, teacher, *a, **k):
        original_init(self, cfg, teacher, *a, **k)
        if self.guidance is not None and self.stage == "nerf":
            self.guidance = ReferenceView(self.guidance, self, teacher, cfg, args)

    trainer_module.AssetTrainer.__init__ = init
    sys.argv = [str(Path(__file__).with_name("compare_guidance.py")), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


class ReferenceView:
    """The trainer's guidance with the reference view's squared error added to its loss (module docstring)."""

    def __init__(self, inner, trainer, teacher, cfg, args):
        from PIL import Image

        from text3d.cameras import spherical_cameras
        from text3d.prompts import prompts_for_cameras
        from text3d.teacher.sampling import sample_images

        self.inner, self.trainer, self.args = inner, trainer, args
        self.radius, self.fovy = cfg.camera.eval_radius, cfg.camera.eval_fovy
        cams = spherical_cameras(args.elevation, 0.0, self.radius, self.fovy)
        prompt = prompts_for_cameras(cfg.prompt, cams, cfg.prompts, cfg.camera)
        state = torch.random.get_rng_state()  # the run's own draws stay as they were
        with teacher.viewing(cams.to(teacher.device)):
            self.reference = sample_images(teacher, prompt, steps=args.steps, guidance_scale=5.0,
                                           generator=torch.Generator().manual_seed(cfg.seed)).to(trainer.device)
        torch.random.set_rng_state(state)
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        pixels = (self.reference[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype("uint8")
        Image.fromarray(pixels).save(trainer.run_dir / "reference.png")

    def __call__(self, images, prompts, progress=0.0, cameras=None):
        import torch.nn.functional as F

        from text3d.cameras import jittered_light_dirs, spherical_cameras

        g = self.inner(images, prompts, progress=progress, cameras=cameras)
        d = (torch.rand(2) * 2 - 1) * self.args.jitter if self.args.jitter > 0 else torch.zeros(2)
        cams = spherical_cameras(self.args.elevation + float(d[0]), float(d[1]), self.radius, self.fovy)
        cams = cams.to(self.trainer.device)
        res = images.shape[-1]
        out = self.trainer.renderer(cams, res, res, shading="lambertian", light_dirs=jittered_light_dirs(cams, 0.0),
                                    ambient=self.trainer.train_cfg.ambient)
        ref = self.reference
        if ref.shape[-1] != res:
            ref = F.interpolate(ref, size=(res, res), mode="bilinear", antialias=True)
        g.loss = g.loss + 0.5 * self.args.weight * (out["rgb"] - ref).pow(2).sum()
        return g

    def update(self, *a, **k):
        return self.inner.update(*a, **k)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        return self.inner.load_state_dict(state)


if __name__ == "__main__":
    main()
