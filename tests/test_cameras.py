"""The camera convention: positions, look-at frames, rays and DreamFusion view labels."""

import pytest
import torch

from text3d.cameras import CameraSamplerConfig, orbit_cameras, sample_cameras, spherical_cameras, view_label
from text3d.prompts import PromptConfig, prompts_for_cameras, validate_prompt
from text3d.errors import UserError


@pytest.mark.parametrize("elevation, azimuth, label", [
    (0, 0, "front"), (10, 30, "front"), (0, -44, "front"), (0, 46, "side"), (0, 90, "side"), (0, -90, "side"),
    (0, 134, "side"), (0, 136, "back"), (0, 180, "back"), (0, -180, "back"), (0, 540, "back"), (0, 360, "front"),
    (61, 0, "overhead"), (89, 180, "overhead"), (59, 180, "back"),
])
def test_view_labels_at_known_angles(elevation, azimuth, label):
    assert view_label(elevation, azimuth) == label


def test_positions_follow_the_documented_convention():
    cams = spherical_cameras([0, 0, 0, 90], [0, 90, 180, 0], 2.0, 40.0)
    expected = torch.tensor([[0, 0, 2.0], [2.0, 0, 0], [0, 0, -2.0], [0, 2.0, 0]])
    assert torch.allclose(cams.position, expected, atol=1e-5)
    assert cams.view_labels() == ["front", "side", "back", "overhead"]


def test_frames_are_orthonormal_and_look_at_the_origin():
    cams = sample_cameras(CameraSamplerConfig(elevation=(-89.0, 89.0)), 64, torch.Generator().manual_seed(0))
    rot = cams.c2w[:, :3, :3]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(64), atol=1e-5)  # right-handed
    forward = -rot[:, :, 2]
    to_origin = -cams.position / cams.position.norm(dim=-1, keepdim=True)
    assert torch.allclose(forward, to_origin, atol=1e-5)
    assert (rot[:, 1, 1] > 0).all()  # camera up has a positive world-Y component


def test_rays_centre_pixel_hits_origin_and_top_row_points_up():
    cams = spherical_cameras(20.0, 30.0, 2.5, 40.0)
    origins, dirs = cams.rays(5, 5)
    centre = dirs[0, 2, 2]
    closest = origins[0, 2, 2] + centre * (-(origins[0, 2, 2] @ centre))
    assert closest.norm() < 1e-5
    assert dirs[0, 0, 2, 1] > dirs[0, 4, 2, 1]  # row 0 is the top of the image
    # right is +X when looking at the front from +Z
    _, front_dirs = spherical_cameras(0.0, 0.0, 2.0, 40.0).rays(4, 4)
    assert front_dirs[0, 1, 3, 0] > 0 > front_dirs[0, 1, 0, 0]
    # the vertical field of view: top and bottom pixel centres subtend fovy*(H-1)/H
    h = 101
    _, d = spherical_cameras(0.0, 0.0, 2.0, 40.0).rays(h, 1)
    angle = torch.rad2deg(torch.acos((d[0, 0, 0] * d[0, -1, 0]).sum()))
    expected = 2 * torch.rad2deg(torch.atan(torch.tan(torch.deg2rad(torch.tensor(20.0))) * (h - 1) / h))
    assert abs(float(angle - expected)) < 1e-3


def test_sampler_respects_ranges_and_seed():
    cfg = CameraSamplerConfig()
    a = sample_cameras(cfg, 256, torch.Generator().manual_seed(1))
    b = sample_cameras(cfg, 256, torch.Generator().manual_seed(1))
    assert torch.equal(a.c2w, b.c2w)
    assert a.radius.min() >= cfg.radius[0] and a.radius.max() <= cfg.radius[1]
    assert a.elevation.min() >= cfg.elevation[0] and a.elevation.max() <= cfg.elevation[1]
    orbit = orbit_cameras(cfg, 4)
    assert orbit.view_labels() == ["front", "side", "back", "side"]


def test_view_dependent_prompts_and_validation():
    cams = spherical_cameras([0, 0, 70], [0, 180, 0], 2.0, 40.0)
    assert prompts_for_cameras("a red cube", cams, PromptConfig()) == [
        "a red cube, front view", "a red cube, back view", "a red cube, overhead view"]
    assert prompts_for_cameras("a red cube", cams, PromptConfig(view_dependent=False)) == ["a red cube"] * 3
    assert validate_prompt("  a   red cube ") == "a red cube"
    with pytest.raises(UserError):
        validate_prompt("   ")


def test_reachable_view_labels_follow_the_ranges():
    from text3d.cameras import reachable_view_labels

    assert reachable_view_labels() == ["front", "side", "back"]  # the default cameras never look from overhead
    assert reachable_view_labels(CameraSamplerConfig(elevation=(0.0, 75.0))) == ["front", "side", "back", "overhead"]
    assert reachable_view_labels(CameraSamplerConfig(elevation=(65.0, 80.0))) == ["overhead"]
    assert reachable_view_labels(CameraSamplerConfig(azimuth=(-30.0, 30.0))) == ["front"]
    assert reachable_view_labels(CameraSamplerConfig(azimuth=(60.0, 150.0))) == ["side", "back"]
    # every label a sampled camera gets is among them
    cfg = CameraSamplerConfig(azimuth=(-100.0, 20.0))
    sampled = set(sample_cameras(cfg, 512, torch.Generator().manual_seed(0)).view_labels(cfg))
    assert sampled <= set(reachable_view_labels(cfg)) == {"front", "side"}
