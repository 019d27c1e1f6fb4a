"""Forward warp (fast op vs reference), its invariants, and the depth reliability filter."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lyra_ops.errors import LyraInputError
from lyra_ops.warp import (
    WarpResult,
    depth_reliability_mask,
    forward_warp,
    forward_warp_reference,
    unproject_depth,
)

EYE = torch.eye(4)


def intrinsics(height: int, width: int, focal: float | None = None) -> torch.Tensor:
    f = focal if focal is not None else 0.9 * width
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def random_pose(g: torch.Generator, rot: float = 0.15, trans: float = 0.3) -> torch.Tensor:
    """A random rigid w2c (4,4) float32: rotation of ~``rot`` rad, translation of ~``trans``."""
    a = torch.randn(3, generator=g, dtype=torch.float64) * rot
    skew = torch.tensor([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]], dtype=torch.float64)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = torch.linalg.matrix_exp(skew)
    pose[:3, 3] = torch.randn(3, generator=g, dtype=torch.float64) * trans
    return pose.float()


def random_scene(seed: int, height: int = 40, width: int = 56, channels: int = 3, holes: bool = True):
    """Image in [-1,1], a depth map with steps (boxes at 1-2 in front of 3-8) and optional holes, K."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(channels, height, width, generator=g) * 2 - 1
    rows, cols = torch.meshgrid(torch.arange(height) / height, torch.arange(width) / width, indexing="ij")
    depth = 3.0 + cols + 0.5 * rows + 0.003 * torch.rand(height, width, generator=g)  # slanted wall
    for _ in range(3):
        r0, c0 = (
            torch.randint(0, height - 8, (1,), generator=g).item(),
            torch.randint(0, width - 8, (1,), generator=g).item(),
        )
        depth[r0 : r0 + 8, c0 : c0 + 12] = 1.0 + torch.rand(1, generator=g).item()
    if holes:
        depth[torch.rand(height, width, generator=g) < 0.05] = 0.0
        depth[:3, :5] = -1.0
    return image, depth, intrinsics(height, width)


def assert_close_warps(fast: WarpResult, ref: WarpResult, tol: float = 1e-4) -> None:
    assert torch.equal(fast.mask, ref.mask), f"{int((fast.mask != ref.mask).sum())} mask mismatches"
    assert (fast.rgb - ref.rgb).abs().max().item() < tol
    assert (fast.depth - ref.depth).abs().max().item() < tol


# ------------------------------------------------------------------------------------------------ warp


def test_identity_pose_reproduces_the_input():
    image, depth, K = random_scene(0)
    depth[10:20, 10:20] = 60.0  # a large step: depth weights up to exp(50) must not leak round-off
    out = forward_warp(image, depth, K, EYE, K, EYE[None])
    valid = depth > 0
    assert torch.equal(out.mask[0, 0], valid)
    assert (out.rgb[0][:, valid] - image[:, valid]).abs().max().item() < 1e-5
    assert (out.depth[0, 0][valid] - depth[valid]).abs().max().item() < 1e-5
    assert torch.all(out.rgb[0][:, ~valid] == -1.0) and torch.all(out.depth[0, 0][~valid] == 0.0)


def test_integer_pixel_shift_puts_all_weight_on_one_pixel():
    # Fronto-parallel plane at depth 2, f = 40: a sideways move of 0.1 shifts the image by exactly 2 pixels.
    h, w = 12, 16
    image = torch.rand(3, h, w) * 2 - 1
    depth = torch.full((h, w), 2.0)
    K = intrinsics(h, w, focal=40.0)
    w2c = torch.eye(4)
    w2c[0, 3] = -0.1  # camera centre at x = +0.1: the scene moves 2 px to the left
    for out in (
        forward_warp(image, depth, K, EYE, K, w2c),
        forward_warp_reference(image, depth, K, EYE, K, w2c),
    ):
        assert torch.equal(out.mask[0, 0, :, : w - 2], torch.ones(h, w - 2, dtype=torch.bool))
        assert not out.mask[0, 0, :, w - 2 :].any()
        assert (out.rgb[0, :, :, : w - 2] - image[:, :, 2:]).abs().max().item() < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_fast_matches_reference_on_random_scenes(seed: int, channels: int):
    image, depth, K = random_scene(seed, channels=channels, holes=seed == 1)
    g = torch.Generator().manual_seed(100 + seed)
    w2c = torch.stack([random_pose(g) for _ in range(4)])
    K_tgt = torch.stack([K, K * torch.tensor([[1.1], [1.1], [1.0]]), K, K])  # one zoomed-in target
    mask = depth_reliability_mask(depth) if seed != 1 else None
    fast = forward_warp(image, depth, K, EYE, K_tgt, w2c, source_mask=mask)
    ref = forward_warp_reference(image, depth, K, EYE, K_tgt, w2c, source_mask=mask)
    assert 0.2 < fast.mask.float().mean().item() < 1.0
    assert_close_warps(fast, ref)


def test_frames_are_bit_identical_alone_or_batched():
    image, depth, K = random_scene(3)
    g = torch.Generator().manual_seed(7)
    w2c = torch.stack([random_pose(g, trans=0.1 * (i + 1)) for i in range(5)])
    # A far-looking frame in the batch changes the batch's max depth: it must not affect the others.
    w2c[2, :3, 3] += torch.tensor([0.0, 0.0, -30.0])
    together = forward_warp(image, depth, K, EYE, K, w2c)
    for f in range(5):
        alone = forward_warp(image, depth, K, EYE, K, w2c[f])
        pair = forward_warp(image, depth, K, EYE, K, w2c[[f, 2]])
        for field in ("rgb", "depth", "mask"):
            assert torch.equal(getattr(alone, field)[0], getattr(together, field)[f])
            assert torch.equal(getattr(pair, field)[0], getattr(together, field)[f])


def test_camera_behind_the_points_leaves_holes():
    image, depth, K = random_scene(4, holes=False)
    behind = torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0]))  # turned around: every point has z' < 0
    out = forward_warp(image, depth, K, EYE, K, behind, hole_value=0.25)
    assert not out.mask.any()
    assert torch.all(out.rgb == 0.25) and torch.all(out.depth == 0.0)
    # Camera moved into the scene (z = 2.5): the boxes (1-2) are behind it, only the wall (3-4.5) remains.
    inside = torch.eye(4)
    inside[2, 3] = -2.5
    out = forward_warp(image, depth, K, EYE, K, inside)
    ref = forward_warp_reference(image, depth, K, EYE, K, inside)
    assert_close_warps(out, ref)
    assert out.mask.any() and not out.mask.all()
    assert out.depth[out.mask].min().item() > 0


def test_points_on_or_just_in_front_of_the_camera_plane_are_handled():
    image, depth, K = random_scene(12, holes=False)
    depth[:, :10] = 2.0  # exactly on the target camera plane: z' = 0, dropped
    depth[:, 10:12] = 2.0 + 1e-12  # z' ~ 1e-12: projected ~1e13 px away, off-image
    forward = torch.eye(4)
    forward[2, 3] = -2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = forward_warp(image, depth, K, EYE, K, forward)
        ref = forward_warp_reference(image, depth, K, EYE, K, forward)
    assert_close_warps(fast, ref)
    assert fast.mask.any()


def test_hole_value_and_mask_semantics():
    image, depth, K = random_scene(5)
    g = torch.Generator().manual_seed(5)
    w2c = torch.stack([random_pose(g) for _ in range(3)])
    out = forward_warp(image, depth, K, EYE, K, w2c, hole_value=3.5)
    holes = ~out.mask.expand_as(out.rgb)
    assert holes.any()
    assert torch.all(out.rgb[holes] == 3.5)
    assert torch.all(out.depth[~out.mask] == 0.0) and torch.all(out.depth[out.mask] > 0)
    assert out.rgb[~holes].abs().max().item() <= 1.0 + 1e-6  # convex combinations of colours in [-1, 1]
    assert out.mask.dtype == torch.bool and out.rgb.shape == (3, 3, *depth.shape)
    assert out.depth.shape == out.mask.shape == (3, 1, *depth.shape)


def test_no_valid_source_pixel_gives_an_empty_warp():
    image, depth, K = random_scene(10)
    for op in (forward_warp, forward_warp_reference):
        out = op(image, torch.zeros_like(depth), K, EYE, K, torch.stack([EYE, EYE]))
        assert not out.mask.any() and torch.all(out.rgb == -1.0) and torch.all(out.depth == 0.0)


def test_a_single_pose_or_intrinsics_is_shared_by_all_frames():
    image, depth, K = random_scene(11)
    g = torch.Generator().manual_seed(11)
    pose = random_pose(g)
    zooms = torch.stack([K, K * torch.tensor([[1.2], [1.2], [1.0]])])
    shared_pose = forward_warp(image, depth, K, EYE, zooms, pose)
    explicit = forward_warp(image, depth, K, EYE, zooms, torch.stack([pose, pose]))
    assert torch.equal(shared_pose.rgb, explicit.rgb) and shared_pose.num_frames == 2
    assert_close_warps(shared_pose, forward_warp_reference(image, depth, K, EYE, zooms, pose))


def test_source_mask_excludes_pixels():
    image, depth, K = random_scene(6, holes=False)
    keep = torch.ones_like(depth, dtype=torch.bool)
    keep[:, : depth.shape[1] // 2] = False
    out = forward_warp(image, depth, K, EYE, K, EYE, source_mask=keep)
    assert torch.equal(out.mask[0, 0], keep)


def test_near_points_win_over_far_points():
    # A near card (depth 1) in front of a far wall (depth 5); moving right slides the card over the wall.
    h, w = 24, 32
    depth = torch.full((h, w), 5.0)
    depth[6:18, 4:12] = 1.0
    image = torch.full((1, h, w), -0.5)
    image[0, 6:18, 4:12] = 0.5
    K = intrinsics(h, w, focal=20.0)
    w2c = torch.eye(4)
    w2c[0, 3] = -0.23  # card moves 4.6 px left, wall 0.92 px left (non-integral: real mixing)
    out = forward_warp(image, depth, K, EYE, K, w2c)
    card = out.mask[0, 0] & (out.depth[0, 0] < 2)
    assert card.sum() > 60
    assert (out.rgb[0, 0][card] - 0.5).abs().max().item() < 1e-3


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    channels=st.integers(1, 3),
    frames=st.integers(1, 3),
    trans=st.sampled_from([0.0, 0.05, 0.5]),
    scale=st.sampled_from([0.0, 50.0, 500.0]),
)
def test_property_fast_equals_reference(seed, height, width, channels, frames, trans, scale):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(channels, height, width, generator=g) * 2 - 1
    depth = torch.rand(height, width, generator=g) * 4 + 0.2
    depth[torch.rand(height, width, generator=g) < 0.2] = 0.0
    K = intrinsics(height, width, focal=float(max(height, width)))
    w2c = torch.stack([random_pose(g, rot=0.1 if trans else 0.0, trans=trans) for _ in range(frames)])
    fast = forward_warp(image, depth, K, EYE, K, w2c, depth_weight_scale=scale)
    ref = forward_warp_reference(image, depth, K, EYE, K, w2c, depth_weight_scale=scale)
    assert_close_warps(fast, ref)
    if trans == 0.0:  # identity pose: the input comes back
        valid = (depth > 0).expand(frames, 1, height, width)
        assert torch.equal(fast.mask, valid)
        err = (fast.rgb - image)[valid.expand_as(fast.rgb)].abs()
        assert err.numel() == 0 or err.max().item() < 1e-5


def test_float64_image_gives_float64_result():
    image, depth, K = random_scene(8)
    out = forward_warp(image.double(), depth.double(), K.double(), EYE.double(), K, EYE)
    assert out.rgb.dtype == out.depth.dtype == torch.float64


# ------------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"image": torch.zeros(8, 10)}, "image"),
        ({"image": torch.zeros(3, 8, 10, dtype=torch.uint8)}, "image"),
        ({"depth": torch.ones(8, 11)}, "depth"),
        ({"depth": torch.full((8, 10), float("nan"))}, "depth"),
        ({"K_src": torch.eye(4)}, "K_src"),
        ({"c2w_src": torch.eye(3)}, "c2w_src"),
        ({"K_tgt": torch.eye(3)[None].repeat(3, 1, 1)}, "K_tgt"),
        ({"w2c_tgt": torch.eye(4)[None, :3]}, "w2c_tgt"),
        ({"source_mask": torch.ones(8, 10)}, "source_mask"),
        ({"source_mask": torch.ones(9, 10, dtype=torch.bool)}, "source_mask"),
        ({"depth_weight_scale": -1.0}, "depth_weight_scale"),
    ],
)
@pytest.mark.parametrize("op", [forward_warp, forward_warp_reference])
def test_bad_inputs_name_the_argument(op, change, name):
    args = {
        "image": torch.zeros(3, 8, 10),
        "depth": torch.ones(8, 10),
        "K_src": intrinsics(8, 10),
        "c2w_src": EYE,
        "K_tgt": intrinsics(8, 10),
        "w2c_tgt": torch.eye(4)[None].repeat(2, 1, 1),
    }
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("source_mask", "depth_weight_scale") if k in args}
    with pytest.raises(LyraInputError, match=name):
        op(*args.values(), **kwargs)


def test_warp_result_validates_shapes():
    with pytest.raises(LyraInputError, match="depth"):
        WarpResult(
            torch.zeros(2, 3, 4, 5), torch.zeros(2, 1, 4, 6), torch.zeros(2, 1, 4, 5, dtype=torch.bool)
        )
    with pytest.raises(LyraInputError, match="mask"):
        WarpResult(torch.zeros(2, 3, 4, 5), torch.zeros(2, 1, 4, 5), torch.zeros(2, 1, 4, 5))


# ------------------------------------------------------------------------------------------------ geometry


def test_unproject_depth_pixel_centres_and_pose():
    K = torch.tensor([[10.0, 0.0, 2.0], [0.0, 20.0, 1.0], [0.0, 0.0, 1.0]])
    depth = torch.tensor([[2.0, 0.0, 1.0, 1.0], [4.0, 1.0, -3.0, 1.0]])
    c2w = torch.eye(4)
    c2w[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    pts = unproject_depth(depth, K, c2w)
    # pixel (row 1, col 0): d = 4, (u, v) = (0.5, 1.5): x = 4 (0.5 - 2) / 10, y = 4 (1.5 - 1) / 20.
    assert torch.allclose(pts[1, 0], torch.tensor([4 * -1.5 / 10 + 1, 4 * 0.5 / 20 + 2, 4.0 + 3]))
    assert torch.all(pts[0, 1] == 0) and torch.all(pts[1, 2] == 0)
    assert pts.shape == (2, 4, 3) and pts.dtype == torch.float32


def test_unproject_then_identity_projection_round_trip():
    _, depth, K = random_scene(9, holes=False)
    pts = unproject_depth(depth.double(), K, EYE)
    uvw = pts.reshape(-1, 3) @ K.double().T
    uv = uvw[:, :2] / uvw[:, 2:]
    i, j = torch.meshgrid(torch.arange(depth.shape[0]), torch.arange(depth.shape[1]), indexing="ij")
    expected = torch.stack([j.reshape(-1) + 0.5, i.reshape(-1) + 0.5], 1).double()
    assert (uv - expected).abs().max().item() < 1e-9


# ------------------------------------------------------------------------------------------------ reliability


def test_reliability_mask_on_a_step_edge():
    depth = torch.full((20, 30), 2.0)
    depth[:, 15:] = 6.0
    reliable = depth_reliability_mask(depth)
    assert not reliable[:, 13:17].any()  # within 2 px of the step
    assert reliable[:, :13].all() and reliable[:, 17:].all()  # flat areas, borders included


def test_reliability_mask_constant_depth_is_reliable_at_the_borders():
    # Lyra counted zero padding in the mean, which made rho > tau on the borders; the fix averages only
    # in-image pixels, so a constant map is reliable everywhere.
    depth = torch.full((2, 12, 9), 3.0)
    assert depth_reliability_mask(depth).all()
    assert depth_reliability_mask(depth[0], window=7, threshold=1e-6).all()


def test_reliability_mask_threshold_and_invalid_depth():
    depth = torch.linspace(1.0, 2.0, 40).repeat(10, 1)  # a smooth ramp: range over 5 px ~ 4 % of the mean
    assert depth_reliability_mask(depth, threshold=0.1).all()
    assert not depth_reliability_mask(depth, threshold=0.01)[:, 5:-5].any()
    depth[3, 3] = 0.0
    reliable = depth_reliability_mask(depth, threshold=0.1)
    assert not reliable[1:6, 1:6].any() and reliable[8:, 8:].all()


def test_reliability_mask_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    depth = 1 + torch.rand(7, 8, generator=g)
    depth[2, 3] = 10.0
    out = depth_reliability_mask(depth, window=3, threshold=0.4)
    for i in range(7):
        for j in range(8):
            win = depth[max(0, i - 1) : i + 2, max(0, j - 1) : j + 2]
            rho = (win.max() - win.min()) / (win.mean() + 1e-6)
            assert bool(out[i, j]) == bool(rho < 0.4), (i, j)


@pytest.mark.parametrize("window", [0, 4, 2.5])
def test_reliability_mask_rejects_bad_windows(window):
    with pytest.raises(LyraInputError, match="window"):
        depth_reliability_mask(torch.ones(5, 5), window=window)
    with pytest.raises(LyraInputError, match="depth"):
        depth_reliability_mask(torch.ones(5))


def test_several_sources_splat_together_and_one_source_is_forward_warp():
    """forward_warp_sources: one source gives forward_warp's result bit for bit; two copies of a source give the
    same colours (the weights double, the average does not change) and depth."""
    from lyra_ops.warp import forward_warp_sources

    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 24, 32, generator=g) * 2 - 1
    depth = 2.0 + torch.rand(24, 32, generator=g)
    K = torch.tensor([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]])
    w2c = torch.eye(4).repeat(2, 1, 1)
    w2c[:, 0, 3] = torch.tensor([0.05, -0.1])
    one = forward_warp(image, depth, K, torch.eye(4), K, w2c)
    same = forward_warp_sources([image], [depth], [K], [torch.eye(4)], K, w2c)
    assert torch.equal(one.rgb, same.rgb) and torch.equal(one.depth, same.depth) and torch.equal(one.mask, same.mask)
    twice = forward_warp_sources([image, image], [depth, depth], [K, K], [torch.eye(4)] * 2, K, w2c)
    torch.testing.assert_close(twice.rgb, one.rgb, atol=1e-5, rtol=0)
    assert torch.equal(twice.mask, one.mask)
    with pytest.raises(LyraInputError, match="equally long"):
        forward_warp_sources([image], [depth, depth], [K], [torch.eye(4)], K, w2c)
