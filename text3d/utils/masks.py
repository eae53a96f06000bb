"""Opacity masks compared: the IoU of two batches of masks, used by the export's iso-level choice and the judge."""

from __future__ import annotations

import torch


def silhouette_iou(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Per-image IoU of opacity masks [B, 1, H, W] thresholded at 0.5 (1 where both are empty)."""
    a, b = pred > 0.5, target > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).tolist()
