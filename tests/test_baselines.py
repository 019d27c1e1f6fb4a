"""lyra_ops.baselines: flat image, RGB-D Gaussians, held-out cameras, seen-pixel masks, depth AbsRel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lyra_ops.baselines import (
    depth_absrel,
    flat_image,
    held_out_cameras,
    median_depth,
    plane_depth,
    rgbd_gaussians,
    seen_mask,
)
from lyra_ops.cameras import Cameras, default_intrinsics
from lyra_ops.errors import LyraInputError
from lyra_ops.metrics import psnr, source_visibility
from lyra_ops.rasterize import rasterize
from lyra_ops.scenes import make_scene
from lyra_ops.trajectories import LYRA_PATHS, draw_distance, make_trajectory

H, W = 48, 80


def lyra_paths(seed: int, frames: int = 9, height: int = H, width: int = W) -> list[Cameras]:
    k = default_intrinsics(height, width)
    rng = np.random.default_rng(seed)
    return [make_trajectory(n, k, height, width, frames, distance=draw_distance(s, rng)) for n, s in LYRA_PATHS.items()]


def test_flat_image_is_the_mean_colour():
    rgb = torch.zeros(3, 2, 2)
    rgb[0] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # red mean 0.5
    rgb[2] = 0.25
    out = flat_image(rgb, 3, 5)
    assert out.shape == (3, 3, 5)
    assert torch.allclose(out[:, 1, 4], torch.tensor([0.5, 0.0, 0.25]))
    assert torch.equal(out, out[:, :1, :1].expand(3, 3, 5))
    with pytest.raises(LyraInputError):
        flat_image(torch.zeros(2, 4, 4), 4, 4)


def test_rgbd_gaussians_sit_on_the_pixel_rays_and_render_back():
    world = make_scene(3)
    cams = lyra_paths(3)[0]
    gt = world.render(cams.c2w[:1], cams.K[:1], H, W)
    depth = gt.depth[0].clone()
    depth[0, 0, :5] = 0.0  # no Gaussian where the depth is invalid
    g = rgbd_gaussians(gt.rgb[0], depth, cams.K[0], cams.c2w[0])
    assert g.num == H * W - 5
    assert torch.allclose(g.opacities, torch.full_like(g.opacities, 0.95))
    # every mean projects back onto its pixel centre at its depth
    cam = g.means.double() @ cams.w2c[0, :3, :3].double().T + cams.w2c[0, :3, 3].double()
    uv = cam @ cams.K[0].double().T
    u, v = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2]
    assert torch.allclose(u - 0.5, (u - 0.5).round(), atol=1e-3)
    assert torch.allclose(v - 0.5, (v - 0.5).round(), atol=1e-3)
    # isotropic scale = 0.2 x pixel footprint
    assert torch.allclose(g.scales[:, 0], 0.2 * cam[:, 2].float() / cams.K[0, 0, 0], rtol=1e-4)
    out = rasterize(g, cams.w2c[:1], cams.K[:1], W, H, background=torch.ones(3), near=0.1, far=500.0)
    assert float(psnr(out.rgb, gt.rgb)) > 22.0


def test_held_out_cameras_are_seeded_new_poses_inside_the_region():
    paths = lyra_paths(7)
    c2w = torch.cat([p.c2w for p in paths])
    k = paths[0].K[0]
    make = lambda seed, **kw: held_out_cameras(c2w, c2w[0], k, H, W, 12, torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a, b, c = make(1), make(1), make(2)
    assert torch.equal(a.c2w, b.c2w) and not torch.allclose(a.c2w, c.c2w)
    assert (a.height, a.width) == (H, W) and torch.equal(a.K, k.expand(12, 3, 3))
    centres = c2w[:, :3, 3].double()
    lo, hi = centres.amin(0), centres.amax(0)
    pad = 0.25 * (hi - lo)
    pos = a.centers.double()
    assert bool(((pos >= lo - pad - 1e-6) & (pos <= hi + pad + 1e-6)).all())
    assert float(torch.cdist(pos, centres).min()) >= 0.02  # never on a trajectory
    # optical axes within yaw/pitch <= 15 degrees of the input camera's (cos >= cos^2 15 deg)
    cos = a.c2w[:, :3, 2].double() @ c2w[0, :3, 2].double()
    assert float(cos.min()) >= math.cos(math.radians(15)) ** 2 - 1e-6
    assert float(cos.min()) < 0.9999  # actually perturbed
    # the spread covers several axes, not a line
    assert bool(((pos.amax(0) - pos.amin(0)) > 0.2 * (hi - lo)).all())
    # bounds and the accept predicate are respected
    bounded = make(3, bounds=(torch.tensor([-1.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])))
    assert float(bounded.centers[:, 2].min()) >= 0.0
    right = make(4, accept=lambda p: p[:, 0] > 0)
    assert float(right.centers[:, 0].min()) > 0
    with pytest.raises(LyraInputError, match="passed the checks"):
        make(5, accept=lambda p: torch.zeros(p.shape[0], dtype=torch.bool), max_rounds=3)


def test_seen_mask_hand_case_frustum_and_occluder():
    k = default_intrinsics(H, W).double()
    eye = torch.eye(4, dtype=torch.float64)
    plane = torch.full((H, W), 2.0, dtype=torch.float64)
    assert bool(seen_mask(plane, k, eye, plane[None], k[None], eye[None]).all())  # the same view sees everything
    # an occluder (depth 1) in the input frame hides the plane behind it: its interior is unseen
    occluded = plane.clone()
    occluded[10:30, 20:50] = 1.0
    mask = seen_mask(plane, k, eye, occluded[None], k[None], eye[None])
    assert not bool(mask[11:29, 21:49].any())
    assert bool(mask[:9].all()) and bool(mask[31:].all())
    # a camera moved far to the right sees beyond the input frustum on its right side
    moved = eye.clone()
    moved[0, 3] = 1.5
    mask = seen_mask(plane, k, moved, plane[None], k[None], eye[None])
    assert bool(mask[:, : W // 4].all()) and not bool(mask[:, -W // 4 :].any())
    # a second input frame placed there covers the rest
    both = seen_mask(plane, k, moved, torch.stack([plane, plane]), torch.stack([k, k]), torch.stack([eye, moved]))
    assert bool(both.all())
    # depth 0 pixels of the target are never seen
    hole = plane.clone()
    hole[0, 0] = 0.0
    assert not bool(seen_mask(hole, k, eye, plane[None], k[None], eye[None])[0, 0])


def test_seen_mask_agrees_with_exact_ray_cast_visibility():
    h, w = 2 * H, 2 * W
    world = make_scene(11)
    paths = lyra_paths(11, height=h, width=w)
    pick = [0, 4, 8]
    inputs = Cameras(torch.cat([p.c2w[pick] for p in paths[:3]]), torch.cat([p.K[pick] for p in paths[:3]]), h, w)
    all_c2w = torch.cat([p.c2w for p in paths])
    targets = held_out_cameras(all_c2w, all_c2w[0], paths[0].K[0], h, w, 3, torch.Generator().manual_seed(0),
                               max_angle_deg=20.0)
    depth_in = world.render(inputs.c2w, inputs.K, h, w).depth
    depth_t = world.render(targets.c2w, targets.K, h, w).depth
    agree = seen_total = hidden = hidden_marked = 0
    for i in range(len(targets)):
        mask = seen_mask(depth_t[i, 0], targets.K[i], targets.c2w[i], depth_in, inputs.K, inputs.c2w)
        ref = torch.zeros(h, w, dtype=torch.bool)
        inside = torch.zeros(h, w, dtype=torch.bool)
        for j in range(len(inputs)):
            vis = source_visibility(world, depth_t[i, 0], targets.c2w[i], targets.K[i], inputs.K[j], inputs.c2w[j])
            ref |= vis.seen
            inside |= vis.inside
        agree += int((mask == ref).sum())
        seen_total += int(ref.sum())
        hidden += int((inside & ~ref).sum())  # in some input frustum but behind something in every frame
        hidden_marked += int((mask & inside & ~ref).sum())
    total = len(targets) * h * w
    assert 0.2 * total < seen_total < total  # a real mix of seen and unseen pixels
    assert agree / total > 0.99
    assert hidden > 100 and hidden_marked < 0.15 * hidden  # occlusion is detected, not only the frustum


def test_depth_absrel_hand_case():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    gt = torch.full_like(pred, 2.0)
    alpha = torch.tensor([[1.0, 1.0], [0.2, 1.0]])[None, None]
    assert float(depth_absrel(pred, gt, alpha)) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    gt0 = gt.clone()
    gt0[..., 1, 1] = 0.0  # gt 0 = no ground truth: left out
    assert float(depth_absrel(pred, gt0, alpha)) == pytest.approx(0.25)
    assert math.isnan(float(depth_absrel(pred, gt, torch.zeros_like(alpha))))  # nothing opaque
    batch = depth_absrel(torch.cat([pred, gt]), torch.cat([gt, gt]), torch.ones(2, 1, 2, 2))
    assert batch.shape == (2,) and float(batch[1]) == 0.0
    with pytest.raises(LyraInputError):
        depth_absrel(pred, gt[..., :1], alpha)


def test_plane_depth_is_the_median_plane():
    input_depth = torch.tensor([[1.0, 3.0, 5.0], [0.0, 3.0, 9.0]])  # positive values 1 3 3 5 9: median 3
    assert median_depth(input_depth) == 3.0
    gt = torch.tensor([2.0, 4.0, 6.0, 0.0]).reshape(1, 1, 1, 4)
    assert float(plane_depth(gt, input_depth)) == pytest.approx((0.5 + 0.25 + 0.5) / 3)
    with pytest.raises(LyraInputError):
        median_depth(torch.zeros(2, 2))
