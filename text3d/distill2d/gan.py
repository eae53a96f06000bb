"""DMD2's GAN: a small classifier head on the bottleneck (mid-block output) of the fake-score UNet.

The fake score is the LoRA on the teacher's UNet, so the head reads the teacher UNet's mid block
while the LoRA is active. Logits are per sample; losses are the non-saturating ones:
discriminator softplus(-D(real)) + softplus(D(fake)), generator softplus(-D(fake)).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class BottleneckClassifier(nn.Module):
    """[B, C, h, w] bottleneck features -> [B] logits."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(1)


def bottleneck_channels(unet) -> int:
    return int(unet.config.block_out_channels[-1])


class FakeScoreDiscriminator(nn.Module):
    """Runs the LoRA UNet on noisy latents and classifies its bottleneck features."""

    def __init__(self, fake, teacher, hidden: int = 64):
        super().__init__()
        self.fake, self.teacher_ref = fake, [teacher]
        self.head = BottleneckClassifier(bottleneck_channels(teacher.unet), hidden).to(teacher.device)
        self._features: list[torch.Tensor] = []

    @contextmanager
    def _capture(self):
        hook = self.teacher_ref[0].unet.mid_block.register_forward_hook(lambda m, i, o: self._features.append(o))
        try:
            yield
        finally:
            hook.remove()

    def logits(self, noisy: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        self._features.clear()
        with self._capture():
            self.fake.raw_output(noisy, t, embeddings)
        features = self._features[-1]
        self._features.clear()
        return self.head(features)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()
