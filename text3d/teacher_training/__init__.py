"""Training of the embedded teacher: a small latent diffusion model in the Stable Diffusion format,
trained from scratch on the synthetic world (``text3d teacher train`` is its command line).

  models.py  the architecture (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, DDPM schedule)
  config.py  TeacherTrainConfig, the settings of a run
  data.py    dataset loading/rendering, vocabulary, caption tokens, batch order, a fake dataset
  stages.py  the VAE stage, the UNet + text encoder stage, EMA, and the checkpointed training loop
  run.py     train_teacher: both stages, latent caching, time budget, resume, writing the folder
  finetune.py  finetune_teacher: stage 2 again from a written teacher, visible-view examples weighted up
  export.py  the diffusers folder (atomic), the load check, the model card, preview samples
  cli.py     `text3d teacher train` (scripts/train_teacher.py wraps it)
"""

from text3d.runtime.signals import Interrupted
from text3d.teacher_training.models import Architecture
from text3d.teacher_training.config import TeacherTrainConfig

__all__ = ["Architecture", "Interrupted", "TeacherTrainConfig", "train_teacher", "write_fake_dataset"]


def __getattr__(name):
    if name == "train_teacher":
        from text3d.teacher_training.run import train_teacher

        return train_teacher
    if name == "write_fake_dataset":
        from text3d.teacher_training.data import write_fake_dataset

        return write_fake_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
