"""Giving a teacher the camera: a view-aware UNet made from one that is not.

MVDream and Zero123 condition their diffusion models on the camera; here, as in MVDream, the camera's
features ``c`` (:func:`text3d.cameras.camera_features`, the flattened camera-to-world matrix, zeros for "no
camera") enter through a small MLP added to the timestep embedding:
``emb(t, c) = emb_t(t) + W2 silu(W1 c + b1) + b2``. diffusers builds exactly this for
``class_embed_type: projection`` (its ``class_embedding``, fed through ``class_labels``), so the result saves and
loads as a plain Stable Diffusion folder and :class:`text3d.teacher.teacher.Teacher` recognises it from its
config. ``W2`` and ``b2`` start at zero: the new UNet predicts exactly what the old one did, for every camera,
and the fine-tune (:func:`text3d.teacher_training.finetune.finetune_teacher` with ``camera_drop``) teaches it
what the camera means, dropping it for a fraction of the examples so "no camera" keeps working.
"""

from __future__ import annotations

import torch

from text3d.cameras import CAMERA_FEATURES, camera_features, spherical_cameras
from text3d.teacher.teacher import camera_input_dim


def with_camera_input(unet, seed: int = 0):
    """``unet`` itself when it already takes a camera, else a copy with a camera embedding whose first layer is
    drawn from ``seed`` (the same whatever the global RNG holds, so a resumed fine-tune rebuilds it alike) and
    whose output layer is zero."""
    if camera_input_dim(unet):
        return unet
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config.update(class_embed_type="projection", projection_class_embeddings_input_dim=CAMERA_FEATURES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        camera_unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = camera_unet.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not key.startswith("class_embedding.") for key in missing):
        raise RuntimeError(f"unexpected UNet weights when adding the camera input: {missing + unexpected}")
    with torch.no_grad():
        camera_unet.class_embedding.linear_2.weight.zero_()
        camera_unet.class_embedding.linear_2.bias.zero_()
    return camera_unet.to(next(unet.parameters()).dtype)


def dataset_camera_features(arrays: dict, indices) -> torch.Tensor:
    """[N, 16] camera features of the dataset examples ``indices`` (their elevation, azimuth, radius, fovy)."""
    idx = torch.as_tensor(indices, dtype=torch.long).numpy()
    cams = spherical_cameras(*(torch.as_tensor(arrays[k][idx]) for k in ("elevation", "azimuth", "radius", "fovy")))
    return camera_features(cams)
