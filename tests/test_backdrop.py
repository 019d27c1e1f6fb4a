"""The export backdrop (issue 14, section 3): an opaque sphere of the training background behind the scene, so a
viewer's own background never shows and an export looks the same over white, grey or anything else."""

from __future__ import annotations

import math

import pytest
import torch

from lyra_ops.cameras import Cameras
from lyra_ops.errors import LyraInputError
from lyra_ops.gaussians import BACKDROP_COUNT, Gaussians, backdrop_gaussians, backdrop_radius
from lyra_pipeline.quality import render_gaussians
from lyra_pipeline.reconstruct import with_backdrop

H, W = 72, 128


def look(position, yaw: float, pitch: float) -> torch.Tensor:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    c2w = torch.eye(4)
    c2w[:3, :3] = ry @ rx
    c2w[:3, 3] = torch.as_tensor(position, dtype=torch.float32)
    return c2w


def cameras(c2ws: list[torch.Tensor], focal: float = 0.6 * W) -> Cameras:
    k = torch.tensor([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1.0]])
    return Cameras(torch.stack(c2ws), k.expand(len(c2ws), 3, 3).clone(), H, W)


def test_backdrop_hides_the_viewer_background_from_anywhere_inside():
    centre, radius, colour = torch.tensor([0.0, 0.0, 2.0]), 12.0, torch.tensor([0.3, 0.6, 0.2])
    g = backdrop_gaussians(centre, radius, colour)
    assert g.num == BACKDROP_COUNT
    torch.testing.assert_close((g.means - centre).norm(dim=-1), torch.full((g.num,), radius))
    # cameras at the centre and up to half the radius away, looking every way (up, level, steeply down)
    views = [look(centre + torch.tensor(offset), yaw, pitch)
             for offset in ((0, 0, 0), (0, 0, 5), (3, 1, 2), (-5, 0, 0), (0, 4, -3))
             for yaw in (0.0, 1.5, 3.0) for pitch in (0.0, 0.7, -1.4)]  # fmt: skip
    cams = cameras(views)
    black = render_gaussians(g, cams, background=torch.zeros(3))
    white = render_gaussians(g, cams, background=torch.ones(3))
    assert float((black.rgb - white.rgb).abs().max()) < 1 / 255  # the viewer's background never shows
    assert float((black.rgb - colour[:, None, None]).abs().max()) < 2 / 255  # a flat colour, no seams


def test_backdrop_leaves_the_scene_as_it_was_over_the_training_background():
    gen = torch.Generator().manual_seed(0)
    n = 400
    means = torch.rand(n, 3, generator=gen) * torch.tensor([4.0, 2.0, 3.0]) + torch.tensor([-2.0, -1.0, 2.0])
    scene = Gaussians(means, torch.rand(n, 3, generator=gen) * 0.08 + 0.02, torch.randn(n, 4, generator=gen),
                      torch.rand(n, generator=gen) * 0.9, torch.rand(n, 3, generator=gen))
    trained_over = torch.tensor([0.45, 0.4, 0.35])
    cam = look((0.0, 0.0, 0.0), 0.0, 0.0)
    cams = cameras([cam, look((0.5, 0.2, 0.3), 0.2, -0.1)])
    with_bd = with_backdrop(scene, cam[:3, 3], trained_over)
    assert with_bd.num == n + BACKDROP_COUNT
    torch.testing.assert_close(with_bd.means[:n], scene.means)
    expected = render_gaussians(scene, cams, background=trained_over).rgb
    assert float(render_gaussians(scene, cams, background=torch.ones(3)).rgb.sub(expected).abs().max()) > 0.1
    for viewer_bg in (torch.ones(3), torch.full((3,), 0.5), torch.zeros(3)):
        got = render_gaussians(with_bd, cams, background=viewer_bg).rgb
        assert float((got - expected).abs().max()) < 2 / 255


def test_backdrop_radius_lies_beyond_every_gaussian_and_inside_the_far_plane():
    centre = torch.zeros(3)
    g = Gaussians(torch.tensor([[0.0, 0.0, 4.0], [1.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.1, 0.5]] * 2),
                  torch.tensor([[1.0, 0, 0, 0]] * 2), torch.ones(2), torch.ones(2, 3))
    assert backdrop_radius(g, centre) == pytest.approx(2.0 * (4.0 + 1.5))
    assert backdrop_radius(g, centre, far=10.0) == pytest.approx(8.0)
    assert backdrop_radius(g.index(torch.zeros(2, dtype=torch.bool)), centre) == 1.0
    with pytest.raises(LyraInputError, match="radius"):
        backdrop_gaussians(centre, 0.0, torch.ones(3))
    with pytest.raises(LyraInputError, match="count"):
        backdrop_gaussians(centre, 1.0, torch.ones(3), count=8)
