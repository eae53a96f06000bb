"""2D distillation: one-step (or few-step) text-to-image students trained from a teacher with the
same teacher layer, LoRA score network and score-distillation core as the 3D guidance. The
student's output x0 plays the part of the rendered view.

SwiftBrush, DMD and DMD2 are presets of one trainer (text3d/configs/distill2d/*.yaml): they differ only in
the parameters of the shared score-distillation core (:mod:`text3d.guidance.core`), the
fake-score updates per student step, the regression and GAN terms, and the student's timesteps.
"""
