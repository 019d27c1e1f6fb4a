"""Seam mesh, ray-cast z-buffer (fast rasterizer vs brute-force Moller-Trumbore) and mask refinement."""

from __future__ import annotations

import pytest
import torch

from lyra_ops.errors import LyraInputError
from lyra_ops.mask_refine import mesh_depth, mesh_depth_reference, refine_mask_conservative, seam_mesh
from lyra_ops.warp import WarpResult, depth_reliability_mask, forward_warp, unproject_depth

EYE = torch.eye(4)
K48 = torch.tensor([[50.0, 0.0, 32.0], [0.0, 50.0, 24.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def random_mesh(seed: int, count: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Triangle soup in front of a camera, with some triangles crossing z = 0, some behind the camera, some
    degenerate (repeated vertex, collinear, zero-size) and a few large ones."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(count, 1, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.8, 1.0])
    tris = (
        centres
        + torch.tensor([0.0, 0.0, 2.5])
        + 0.4 * torch.randn(count, 3, 3, generator=g, dtype=torch.float64)
    )
    tris[:15, :, 2] -= 2.5  # around the camera plane: many cross z = 0
    tris[15:25, :, 2] = -tris[15:25, :, 2].abs() - 0.1  # entirely behind
    tris[25:30, 2] = tris[25:30, 0]  # repeated vertex
    tris[30:35, 2] = 0.3 * tris[30:35, 0] + 0.7 * tris[30:35, 1]  # collinear
    tris[35:38] = tris[35:38, :1]  # a single point
    tris[38:42] *= 4.0  # large
    return tris.reshape(-1, 3), torch.arange(3 * count).reshape(count, 3)


def compare_depths(fast: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(fraction of pixels with the same hit / no-hit, max relative depth difference where both hit)."""
    same = ((fast > 0) == (ref > 0)).double().mean().item()
    both = (fast > 0) & (ref > 0)
    rel = ((fast - ref).abs() / ref.abs())[both].max().item() if both.any() else 0.0
    return same, rel


# ------------------------------------------------------------------------------------------------ ray cast


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_mesh_depth_matches_brute_force_reference(seed: int):
    vertices, faces = random_mesh(seed)
    z = vertices[faces][..., 2]
    assert ((z.amin(1) <= 0) & (z.amax(1) > 0)).sum() >= 5  # the crossing case is exercised
    fast = mesh_depth(vertices, faces, K48, 48, 64)
    ref = mesh_depth_reference(vertices, faces, K48, 48, 64)
    same, rel = compare_depths(fast, ref)
    assert same >= 0.999
    assert rel < 1e-4
    assert (fast > 0).float().mean() > 0.3


def test_triangles_crossing_the_camera_plane_are_cast_exactly():
    # One big triangle from behind the camera (z = -1) to far in front: its visible part covers the image.
    vertices = torch.tensor([[-3.0, -3.0, -1.0], [6.0, -2.0, 4.0], [-2.0, 6.0, 4.0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    fast = mesh_depth(vertices, faces, K48, 48, 64)
    ref = mesh_depth_reference(vertices, faces, K48, 48, 64)
    assert torch.equal(fast > 0, ref > 0) and (fast > 0).any()
    assert compare_depths(fast, ref)[1] < 1e-9
    behind = vertices * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64) - torch.tensor([0, 0, 5.0])
    assert not mesh_depth(behind, faces, K48, 48, 64).any()


def test_quad_at_known_depth_gives_exact_depth_and_no_cracks():
    # Two triangles of the plane z = 3 spanning x, y in [-1, 1]: pixel centres u in [32 - 50/3, 32 + 50/3].
    vertices = torch.tensor([[-1, -1, 3.0], [1, -1, 3.0], [-1, 1, 3.0], [1, 1, 3.0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    depth = mesh_depth(vertices, faces, K48, 48, 64)
    cols = (torch.arange(64) + 0.5 - 32).abs() <= 50 / 3
    rows = (torch.arange(48) + 0.5 - 24).abs() <= 50 / 3
    covered = rows[:, None] & cols[None, :]
    assert torch.equal(depth > 0, covered)  # the shared diagonal passes through pixel centres: no crack
    assert torch.all(depth[covered] == 3.0)


def test_tilted_plane_depth_is_perspective_correct():
    # Plane z = 2 + 0.5 x: along the ray (a, b, 1), z = 2 / (1 - 0.5 a).
    corners = torch.tensor([[-1.5, -1.5], [1.5, -1.5], [-1.5, 1.5], [1.5, 1.5]], dtype=torch.float64)
    vertices = torch.cat([corners, (2 + 0.5 * corners[:, :1])], 1)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    depth = mesh_depth(vertices, faces, K48, 48, 64)
    a = (torch.arange(64, dtype=torch.float64) + 0.5 - 32) / 50
    expected = (2 / (1 - 0.5 * a)).expand(48, 64)
    hit = depth > 0
    assert hit.float().mean() > 0.5
    assert (depth[hit] - expected[hit]).abs().max().item() < 1e-12


def test_mesh_depth_nearest_hit_wins_and_empty_mesh():
    quad = torch.tensor([[-1, -1, 0.0], [1, -1, 0.0], [-1, 1, 0.0], [1, 1, 0.0]], dtype=torch.float64)
    vertices = torch.cat([3 * quad + torch.tensor([0, 0, 5.0]), 0.5 * quad + torch.tensor([0, 0, 2.0])])
    faces = torch.tensor([[0, 1, 2], [1, 3, 2], [4, 5, 6], [5, 7, 6]])
    for op in (mesh_depth, mesh_depth_reference):
        depth = op(vertices, faces, K48, 48, 64)
        assert abs(depth[24, 32] - 2.0) < 1e-12 and abs(depth[24, 32 + 15] - 5.0) < 1e-12
        assert depth[0, 0] == 0.0
    empty = mesh_depth(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), K48, 48, 64)
    assert empty.shape == (48, 64) and not empty.any()


def test_mesh_depth_rejects_bad_inputs():
    v, f = random_mesh(0, 10)
    with pytest.raises(LyraInputError, match="vertices_cam"):
        mesh_depth(v[:, :2], f, K48, 48, 64)
    with pytest.raises(LyraInputError, match="faces"):
        mesh_depth(v, f.double(), K48, 48, 64)
    with pytest.raises(LyraInputError, match="faces"):
        mesh_depth(v, f + 100, K48, 48, 64)
    with pytest.raises(LyraInputError, match="K"):
        mesh_depth_reference(v, f, K48[:2], 48, 64)
    with pytest.raises(LyraInputError, match="height"):
        mesh_depth(v, f, K48, 0, 64)


# ------------------------------------------------------------------------------------------------ seam mesh


def test_seam_mesh_topology():
    h, w = 16, 20
    points = torch.randn(h, w, 3)
    boundary = torch.zeros(h, w, dtype=torch.bool)
    vertices, faces = seam_mesh(points, boundary, factor=4)
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)
    boundary[4, 8] = True  # nearest downsampling by 4 keeps pixel (4i, 4j): coarse vertex (1, 2)
    vertices, faces = seam_mesh(points, boundary, factor=4)
    assert faces.shape == (8, 3)  # the 4 cells around the coarse vertex, 2 triangles each
    assert vertices.shape == (9, 3)  # their 3 x 3 corners; every other vertex is dropped
    assert faces.dtype == torch.int64 and int(faces.max()) == 8
    coarse = torch.nn.functional.interpolate(points.permute(2, 0, 1)[None], size=(4, 5), mode="bilinear")[0]
    assert torch.allclose(vertices[4], coarse[:, 1, 2])  # the centre vertex of the 3 x 3 block
    first = faces[0].tolist()  # cell (0, 1): (tl, tr, bl) = coarse (0,1), (0,2), (1,1) = kept 0, 1, 3
    assert first == [0, 1, 3] and faces[1].tolist() == [1, 4, 3]


def test_seam_mesh_rejects_bad_inputs():
    with pytest.raises(LyraInputError, match="points_cam"):
        seam_mesh(torch.zeros(8, 8), torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(LyraInputError, match="boundary"):
        seam_mesh(torch.zeros(8, 8, 3), torch.zeros(8, 9, dtype=torch.bool))
    with pytest.raises(LyraInputError, match="factor"):
        seam_mesh(torch.zeros(8, 8, 3), torch.zeros(8, 8, dtype=torch.bool), factor=0)


# ------------------------------------------------------------------------------------------------ refinement


def step_scene():
    """A card (depth 2) in front of a wall (depth 6); f = 80 on a 64 x 96 image."""
    h, w = 64, 96
    K = torch.tensor([[80.0, 0.0, w / 2], [0.0, 80.0, h / 2], [0.0, 0.0, 1.0]])
    depth = torch.full((h, w), 6.0)
    depth[20:44, 36:60] = 2.0
    image = torch.full((3, h, w), -0.5)
    image[:, 20:44, 36:60] = 0.8
    return image, depth, K


def sideways(tx: float) -> torch.Tensor:
    w2c = torch.eye(4)
    w2c[0, 3] = -tx  # camera centre at x = +tx
    return w2c


def test_refine_with_identity_pose_on_a_smooth_surface_invalidates_nothing():
    # All pixels are seams, so the mesh covers the whole image, but it lies on the (planar) surface.
    h, w = 32, 48
    K = torch.tensor([[40.0, 0.0, w / 2], [0.0, 40.0, h / 2], [0.0, 0.0, 1.0]])
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    depth = 3.0 + 0.02 * cols + 0.01 * rows
    image = torch.rand(3, h, w) * 2 - 1
    warp = forward_warp(image, depth, K, EYE, K, EYE)
    refined = refine_mask_conservative(
        warp, unproject_depth(depth, K, EYE), torch.ones(h, w, dtype=torch.bool), EYE, K
    )
    assert torch.equal(refined.mask, warp.mask) and torch.equal(refined.rgb, warp.rgb)


@pytest.mark.parametrize("box", [(20, 44, 36, 60), (21, 42, 37, 58), (19, 45, 33, 62)])
def test_refine_with_identity_pose_on_a_step_scene_only_touches_background_at_the_steps(box):
    # The coarse mesh's cells that straddle a step interpolate between card and wall, so even under the
    # identity pose wall pixels right behind them are removed (as in Lyra); nothing else is.
    image, depth, K = step_scene()
    r0, r1, c0, c1 = box
    depth.fill_(6.0)
    depth[r0:r1, c0:c1] = 2.0
    reliable = depth_reliability_mask(depth)
    warp = forward_warp(image, depth, K, EYE, K, EYE, source_mask=reliable)
    refined = refine_mask_conservative(warp, unproject_depth(depth, K, EYE), ~reliable, EYE, K)
    removed = warp.mask[0, 0] & ~refined.mask[0, 0]
    near_step = torch.nn.functional.max_pool2d((~reliable)[None].float(), 9, 1, 4)[0] > 0  # <= 6 px from it
    assert not (removed & ~near_step).any()
    assert not (removed & (depth < 4)).any()
    assert torch.equal(refined.mask[0, 0], warp.mask[0, 0] & ~removed)


def test_refine_removes_background_leaking_through_the_seam():
    image, depth, K = step_scene()
    reliable = depth_reliability_mask(depth)
    points = unproject_depth(depth, K, EYE)
    w2c = torch.stack([sideways(0.3), sideways(-0.5)])
    warp = forward_warp(image, depth, K, EYE, K, w2c, source_mask=reliable)
    refined = refine_mask_conservative(warp, points, ~reliable, w2c, K)
    h, w = depth.shape
    vertices, faces = seam_mesh(points.double(), ~reliable)
    for f, tx in enumerate((0.3, -0.5)):
        # Where the card truly is in the target, shrunk by a pixel: u in [36, 60] - 40 tx, v in [20, 44].
        u, v = torch.arange(w) + 0.5, torch.arange(h) + 0.5
        card = ((v > 21) & (v < 43))[:, None] & ((u > 37 - 40 * tx) & (u < 59 - 40 * tx))[None, :]
        wall = warp.mask[f, 0] & (warp.depth[f, 0] > 4)
        leak = wall & card  # the wall seen where the card should hide it
        assert leak.any()
        # The seam surface (brute-force ray cast) lies in front of every leaking pixel it covers...
        z_mesh = mesh_depth_reference(
            vertices @ w2c[f, :3, :3].double().T + w2c[f, :3, 3].double(), faces, K.double(), h, w
        )
        in_seam = leak & (z_mesh > 0) & (z_mesh + 0.02 < warp.depth[f, 0])
        assert in_seam.any()
        # ... and the refinement removes all of them, keeps every card pixel, and only touches the seams.
        assert not (refined.mask[f, 0] & in_seam).any()
        assert (refined.mask[f, 0] & leak).sum() < leak.sum()
        removed = warp.mask[f, 0] & ~refined.mask[f, 0]
        assert not (removed & (warp.depth[f, 0] < 4)).any()
        assert torch.all(refined.rgb[f][:, removed] == -1.0) and torch.all(refined.depth[f, 0][removed] == 0)
        assert removed.sum() < 0.02 * h * w


def test_refine_frames_alone_equal_frames_together_and_input_is_untouched():
    image, depth, K = step_scene()
    reliable = depth_reliability_mask(depth)
    points = unproject_depth(depth, K, EYE)
    w2c = torch.stack([sideways(0.3), sideways(-0.2), EYE, sideways(0.6)])
    warp = forward_warp(image, depth, K, EYE, K, w2c, source_mask=reliable)
    before = WarpResult(warp.rgb.clone(), warp.depth.clone(), warp.mask.clone())
    together = refine_mask_conservative(warp, points, ~reliable, w2c, K)
    for f in range(4):
        one = WarpResult(warp.rgb[f : f + 1], warp.depth[f : f + 1], warp.mask[f : f + 1])
        alone = refine_mask_conservative(one, points, ~reliable, w2c[f], K)
        for field in ("rgb", "depth", "mask"):
            assert torch.equal(getattr(alone, field)[0], getattr(together, field)[f])
    for field in ("rgb", "depth", "mask"):
        assert torch.equal(getattr(warp, field), getattr(before, field))


def test_refine_fast_equals_reference_method():
    image, depth, K = step_scene()
    reliable = depth_reliability_mask(depth)
    points = unproject_depth(depth, K, EYE)
    w2c = torch.stack([sideways(0.4), sideways(-0.3)])
    warp = forward_warp(image, depth, K, EYE, K, w2c, source_mask=reliable)
    fast = refine_mask_conservative(warp, points, ~reliable, w2c, K, method="fast")
    ref = refine_mask_conservative(warp, points, ~reliable, w2c, K, method="reference")
    assert torch.equal(fast.mask, ref.mask) and torch.equal(fast.rgb, ref.rgb)


def test_refine_rejects_bad_inputs():
    image, depth, K = step_scene()
    warp = forward_warp(image, depth, K, EYE, K, torch.stack([EYE, EYE]))
    points = unproject_depth(depth, K, EYE)
    boundary = ~depth_reliability_mask(depth)
    with pytest.raises(LyraInputError, match="points_world"):
        refine_mask_conservative(warp, points[:-1], boundary, EYE, K)
    with pytest.raises(LyraInputError, match="boundary"):
        refine_mask_conservative(warp, points, boundary.float(), EYE, K)
    with pytest.raises(LyraInputError, match="w2c_tgt"):
        refine_mask_conservative(warp, points, boundary, torch.stack([EYE] * 3), K)
    with pytest.raises(LyraInputError, match="K_tgt"):
        refine_mask_conservative(warp, points, boundary, EYE, K[:2])
    with pytest.raises(LyraInputError, match="method"):
        refine_mask_conservative(warp, points, boundary, EYE, K, method="fastest")
