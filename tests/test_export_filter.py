"""lyra_ops.export_filter: each filter checked against a simple reference (pinhole projection, the rasterizer's
EWA projection, moments of the sub-Gaussians)."""

from __future__ import annotations

import math

import pytest
import torch

from lyra_ops.errors import LyraInputError
from lyra_ops.export_filter import floor_scales, screen_footprint, split_subpixel
from lyra_ops.gaussians import Gaussians
from lyra_ops.rasterize import project_gaussians

H, W = 12, 16
K = torch.tensor([[20.0, 0.0, 8.0], [0.0, 22.0, 6.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def turned_camera() -> torch.Tensor:
    """A camera-to-world pose turned about two axes and moved off the origin (so camera axes != world axes)."""
    a, b = 0.4, -0.3
    ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]], dtype=torch.float64)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = ry @ rx
    c2w[:3, 3] = torch.tensor([0.3, -0.2, 0.5])
    return c2w


def pixel_grid(c2w: torch.Tensor, depth: torch.Tensor, scale_px: float,
               colors: torch.Tensor | None = None) -> Gaussians:
    """One Gaussian per pixel centre at z-depth ``depth`` (H,W), isotropic ``scale_px`` wide at the camera."""
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    cam = torch.stack([(u - K[0, 2]) / K[0, 0] * depth, (v - K[1, 2]) / K[1, 1] * depth, depth], -1).reshape(-1, 3)
    means = cam @ c2w[:3, :3].T + c2w[:3, 3]
    f = 0.5 * (K[0, 0] + K[1, 1])
    scales = (scale_px * depth.reshape(-1, 1) / f).expand(-1, 3).clone()
    quats = torch.tensor([[0.9, 0.1, -0.3, 0.2]], dtype=torch.float64).expand(H * W, 4)
    rgb = torch.rand(H * W, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) if colors is None \
        else colors
    return Gaussians(means, scales, quats.clone(), torch.full((H * W,), 0.9, dtype=torch.float64), rgb)


def project(points: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """Reference pinhole projection of world points (N,3) -> pixel coordinates (N,2)."""
    cam = (points - c2w[:3, 3]) @ c2w[:3, :3]
    return torch.stack([K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2], K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]], -1)


def reference_cov(g: Gaussians, c2w: torch.Tensor) -> torch.Tensor:
    """(M,2,2) screen covariance from the rasterizer's EWA projection, without its dilation."""
    proj = project_gaussians(g, torch.linalg.inv(c2w)[None], K[None], W, H, eps2d=0.0)
    a, b, c = proj.conics[0].unbind(-1)
    det = a * c - b * b
    return torch.stack([c / det, -b / det, -b / det, a / det], -1).reshape(-1, 2, 2)


def test_screen_footprint_matches_the_rasterizers_projection():
    c2w = turned_camera()
    depth = 1.0 + torch.rand(H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = pixel_grid(c2w, depth, 0.3)
    g = Gaussians(g.means, g.scales * torch.tensor([1.0, 0.2, 2.0], dtype=torch.float64), g.quats, g.opacities,
                  g.colors)  # anisotropic
    cam, uv, var = screen_footprint(g, c2w, K)
    assert torch.allclose(uv, project(g.means, c2w), atol=1e-9)
    assert torch.allclose(cam[:, 2], depth.reshape(-1), atol=1e-9)
    expected = torch.linalg.eigvalsh(reference_cov(g, c2w))[:, -1]
    assert torch.allclose(var, expected, rtol=1e-6)
    behind = Gaussians(g.means[:1] - 5 * c2w[:3, 2], g.scales[:1], g.quats[:1], g.opacities[:1], g.colors[:1])
    assert math.isinf(float(screen_footprint(behind, c2w, K)[2][0]))


def test_split_replaces_only_subpixel_gaussians_by_four_over_their_footprint():
    c2w = turned_camera()
    depth = torch.full((H, W), 2.0, dtype=torch.float64)
    depth[:, W // 2 :] = 3.0
    small = pixel_grid(c2w, depth, 0.2)
    wide = pixel_grid(c2w, depth, 1.0).index(torch.arange(5))
    g = Gaussians.cat([wide, small])
    out = split_subpixel(g, c2w, K, H, W, max_std_px=0.35, offset_px=0.25, add_px2=0.05, opacity="split")
    n = small.num
    assert out.num == wide.num + 4 * n
    kept = out.index(torch.arange(wide.num))
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert torch.equal(getattr(kept, name), getattr(wide, name))
    kids = out.index(torch.arange(wide.num, out.num))
    # positions: the parent's pixel +-0.25 px along the image axes, at the parent's depth
    uv = project(kids.means, c2w).reshape(n, 4, 2)
    parent_uv = project(small.means, c2w)[:, None, :]
    signs = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(uv - parent_uv, 0.25 * signs.expand(n, 4, 2), atol=1e-9)
    z = (kids.means - c2w[:3, 3]) @ c2w[:3, 2]
    assert torch.allclose(z.reshape(n, 4), depth.reshape(-1, 1).expand(n, 4), atol=1e-9)
    # widened by add_px2 (z / f)^2; opacities: four coincident copies composite to the parent's
    f = 0.5 * (K[0, 0] + K[1, 1])
    expect = torch.sqrt(small.scales.square() + 0.05 * (depth.reshape(-1, 1) / f).square())
    assert torch.allclose(kids.scales.reshape(n, 4, 3), expect[:, None, :].expand(n, 4, 3), atol=1e-12)
    assert torch.allclose(1 - (1 - kids.opacities.reshape(n, 4)).prod(dim=1), small.opacities, atol=1e-9)
    assert torch.allclose(kids.colors.reshape(n, 4, 3), small.colors[:, None, :].expand(n, 4, 3))


def test_split_children_together_have_the_predicted_screen_variance():
    """Moments of the four (screen mean, covariance) pairs: variance var + add_px2 + offset^2 per image axis."""
    c2w = torch.eye(4, dtype=torch.float64)
    depth = torch.full((H, W), 2.0, dtype=torch.float64)
    g = pixel_grid(c2w, depth, 0.2)
    out = split_subpixel(g, c2w, K, H, W, max_std_px=0.35, offset_px=0.3, add_px2=0.04)
    n = g.num
    cov = reference_cov(out, c2w).reshape(n, 4, 2, 2)
    uv = project(out.means, c2w).reshape(n, 4, 2)
    centred = uv - uv.mean(dim=1, keepdim=True)
    mixture = cov.mean(dim=1) + (centred[..., :, None] * centred[..., None, :]).mean(dim=1)
    parent = reference_cov(g, c2w)
    # isotropic world widening of (z/f)^2 add_px2 shows as add_px2 (fx/f)^2 and (fy/f)^2 on the two axes
    f = 0.5 * (K[0, 0] + K[1, 1])
    added = torch.diag(torch.stack([0.04 * (K[0, 0] / f) ** 2 + 0.09, 0.04 * (K[1, 1] / f) ** 2 + 0.09]))
    # centre pixels only: the EWA Jacobian of a moved mean changes a little away from the optical axis
    centre = torch.tensor([H // 2 * W + W // 2])
    assert torch.allclose(mixture[centre], parent[centre] + added, atol=2e-3)


def test_split_bilinear_colours_follow_a_ramp_and_stop_at_depth_edges():
    c2w = turned_camera()
    u = torch.arange(W, dtype=torch.float64) + 0.5
    ramp = (u / W).expand(H, W).reshape(-1, 1).expand(-1, 3).clone()
    flat = pixel_grid(c2w, torch.full((H, W), 2.0, dtype=torch.float64), 0.2, ramp)
    out = split_subpixel(flat, c2w, K, H, W, offset_px=0.25, colors="bilinear")
    kid_u = project(out.means, c2w)[:, 0].reshape(H, W, 4)
    got = out.colors[:, 0].reshape(H, W, 4)
    interior = got[1:-1, 1:-1]
    assert torch.allclose(interior, (kid_u[1:-1, 1:-1] / W), atol=1e-9)  # a linear ramp is reproduced exactly
    step = torch.full((H, W), 2.0, dtype=torch.float64)
    step[:, W // 2 :] = 4.0  # a depth edge between columns W/2 - 1 and W/2
    edged = split_subpixel(pixel_grid(c2w, step, 0.2, ramp), c2w, K, H, W, colors="bilinear")
    col = edged.colors[:, 0].reshape(H, W, 4)
    # the right-hand sub-Gaussians of the last column before the edge keep their own colour
    assert torch.allclose(col[:, W // 2 - 1, 1], ramp.reshape(H, W, 3)[:, W // 2 - 1, 0])


def test_split_leaves_wide_gaussians_and_nothing_to_split_alone():
    c2w = turned_camera()
    g = pixel_grid(c2w, torch.full((H, W), 2.0, dtype=torch.float64), 0.8)
    assert split_subpixel(g, c2w, K, H, W) is g
    assert split_subpixel(g, c2w, K, H, W, max_std_px=0.0) is g


def test_floor_scales_widens_what_is_below_the_floor_to_it():
    c2w = turned_camera()
    depth = 1.5 + torch.rand(H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    centre = torch.tensor([r * W + c for r in (5, 6) for c in range(6, 11)])  # near the optical axis
    narrow = pixel_grid(c2w, depth, 0.2).index(centre)
    wide = pixel_grid(c2w, depth, 0.9).index(centre)
    g = Gaussians.cat([narrow, wide])
    out = floor_scales(g, c2w, K, 0.5)
    before = torch.linalg.eigvalsh(reference_cov(narrow, c2w))[:, -1]
    f = 0.5 * (K[0, 0] + K[1, 1])
    z = depth.reshape(-1)[centre, None]
    expect = torch.sqrt(narrow.scales.square() + (0.25 - before)[:, None] * (z / f).square())
    assert torch.allclose(out.scales[:10], expect, rtol=1e-9)
    after = torch.linalg.eigvalsh(reference_cov(out, c2w))[:10, -1]
    assert torch.allclose(after, torch.full_like(after, 0.25), rtol=0.15)  # fx != fy: ~ their ratio squared
    assert torch.equal(out.scales[10:], wide.scales)
    assert torch.equal(out.opacities, g.opacities) and torch.equal(out.colors, g.colors)
    assert floor_scales(g, c2w, K, 0.0) is g


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"offset_px": 2.0}, "offset_px: expected a number in"),
    ({"opacity": "sum"}, "opacity: expected one of same, split"),
    ({"colors": "nearest"}, "colors: expected one of same, bilinear"),
    ({"add_px2": -1.0}, "add_px2: expected a number in"),
])
def test_split_rejects_bad_options_in_one_line(kwargs, message):
    g = pixel_grid(torch.eye(4, dtype=torch.float64), torch.full((H, W), 2.0, dtype=torch.float64), 0.2)
    with pytest.raises(LyraInputError, match=message):
        split_subpixel(g, torch.eye(4, dtype=torch.float64), K, H, W, **kwargs)


def test_bad_camera_is_named():
    g = pixel_grid(torch.eye(4, dtype=torch.float64), torch.full((H, W), 2.0, dtype=torch.float64), 0.2)
    with pytest.raises(LyraInputError, match=r"c2w: expected a \(4, 4\)"):
        split_subpixel(g, torch.eye(3, dtype=torch.float64), K, H, W)
    with pytest.raises(LyraInputError, match="K: expected"):
        floor_scales(g, torch.eye(4, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64), 0.5)
