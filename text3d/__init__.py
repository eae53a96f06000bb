"""text3d: text-to-3D asset generation and diffusion distillation on one guidance layer.

Layers (one sub-package each):
  teacher/    load a diffusers Stable-Diffusion-family model and expose the few calls guidance needs
  renderers/  differentiable views g(theta, camera) of a 3D asset (NeRF now, meshes later)
  guidance/   score-distillation gradients (SDS) computed from images, cameras and prompts only
  training/   the optimisation loop, checkpoints and resume
  export/     marching cubes, UV atlas, baked textures, .obj/.glb and turntable videos
"""

__version__ = "0.1.0"
