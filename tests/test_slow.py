"""Slow end-to-end checks (run with `python -m pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch

from lyra_ops.cameras import default_intrinsics
from lyra_ops.mask_refine import refine_mask_conservative
from lyra_ops.metrics import mask_confusion, source_visibility
from lyra_ops.scenes import make_scene
from lyra_ops.seeding import derive_seed, numpy_rng
from lyra_ops.trajectories import LYRA_PATHS, draw_distance, make_trajectory
from lyra_ops.warp import depth_reliability_mask, forward_warp, unproject_depth

pytestmark = pytest.mark.slow


def test_refined_mask_removes_leak_through_at_large_motion():
    """With Lyra's '2x' motion the plain splat mask lets background through; the refined mask removes it."""
    h, w = 96, 160
    K = default_intrinsics(h, w)
    totals = {"occluded_interior": 0, "plain": 0, "refined": 0}
    for i in range(3):
        seed = derive_seed(0, f"proc-{i:06d}")
        scene = make_scene(seed)
        src = scene.render(torch.eye(4)[None], K[None], h, w)
        depth = src.depth[0, 0]
        reliable = depth_reliability_mask(depth, 5, 0.05 * 704 / h)
        points = unproject_depth(depth, K, torch.eye(4))
        for name, spec in LYRA_PATHS.items():
            d = draw_distance(spec, numpy_rng(seed, "trajectory", name), 2.0)
            cams = make_trajectory(name, K, h, w, 9, distance=d)
            warp = forward_warp(src.rgb[0] * 2 - 1, depth, K, torch.eye(4), cams.K, cams.w2c, source_mask=reliable)
            refined = refine_mask_conservative(warp, points, ~reliable, cams.w2c, cams.K, factor=1)
            gt = scene.render(cams.c2w, cams.K, h, w)
            for f in range(1, 9):
                vis = source_visibility(scene, gt.depth[f, 0], cams.c2w[f], cams.K[f], K)
                p, r = mask_confusion(warp.mask[f, 0], vis), mask_confusion(refined.mask[f, 0], vis)
                totals["occluded_interior"] += p["occluded_interior"]
                totals["plain"] += p["leak_interior"]
                totals["refined"] += r["leak_interior"]
    assert totals["plain"] > 0.001 * totals["occluded_interior"]  # the plain mask really leaks here
    assert totals["refined"] <= 0.2 * totals["plain"]  # and refinement cuts it at least 5-fold


def test_default_preset_end_to_end(tmp_path, prefect_harness):
    from flows.evaluate_dataset import evaluate_dataset
    from flows.generate_dataset import generate_dataset

    store = str(tmp_path / "store")
    summary = generate_dataset(store=store, preset="default")
    assert summary["failed_scenes"] == [] and summary["computed"] == 6 * (2 + 6 * 6)
    overall = evaluate_dataset(store=store, preset="default")[-1]
    assert overall["frames"] == 6 * 6 * 24
    assert overall["warp_psnr_gt"] > 20
    assert overall["leak_rate_refined"] <= overall["leak_rate_plain"]
