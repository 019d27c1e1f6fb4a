"""Mask quality and speed on procedural scenes: plain splat mask vs conservative refined mask.

Ground truth comes from the exact ray caster: a target pixel is *truly visible* iff the surface point the
target camera sees there is visible from the source camera (nothing in between) and inside its image.

* leakage rate   = P(mask says valid | pixel's surface is inside the source image but hidden there):
                   background shining through a foreground surface the source never saw
* false-hole rate = P(mask says hole  | pixel truly visible from the source)

Also times the conservative refinement per frame (fast z-buffer ray cast) and, with ``--reference-frames N``,
compares it with the brute-force Moller-Trumbore reference on N frames (same masks expected).

    python benchmarks/bench_masks.py                       # 176x320, 4 scenes x 6 paths x 25 frames
    python benchmarks/bench_masks.py --height 704 --width 1280 --frames 9 --scenes 1 --reference-frames 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lyra_ops.cameras import default_intrinsics
from lyra_ops.mask_refine import refine_mask_conservative
from lyra_ops.scenes import make_scene
from lyra_ops.seeding import derive_seed, numpy_rng
from lyra_ops.trajectories import LYRA_PATHS, draw_distance, make_trajectory
from lyra_ops.warp import depth_reliability_mask, forward_warp, unproject_depth


def source_visibility(
    scene, depth_tgt: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, K_src: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target pixel (H,W) bool pair: (seen by the source camera, inside the source camera's image).

    The source camera is the first frame (identity pose, intrinsics ``K_src``). Seen = inside its image and
    nothing between it and the target's surface point at that pixel.
    """
    pts = unproject_depth(depth_tgt, K, c2w).reshape(-1, 3)
    unoccluded = scene.visible_from(pts, torch.zeros(3))
    uv = (K_src.double() @ pts.double().T).T
    z = uv[:, 2]
    u, v = uv[:, 0] / z, uv[:, 1] / z
    valid = (z > 0) & (depth_tgt.reshape(-1) > 0)
    inside = valid & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    # > 1 px outside: a splat's bilinear footprint reaches 1 px past the image border, so the band is excluded
    outside = ~valid | (u < -1) | (u > width + 1) | (v < -1) | (v > height + 1)
    return (unoccluded & inside).reshape(height, width), inside.reshape(height, width), outside.reshape(height, width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=176)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distance-factor", type=float, default=1.0, help="Lyra's total_movement_distance_factor")
    ap.add_argument("--reference-frames", type=int, default=0, help="frames to also refine with the reference")
    args = ap.parse_args()
    h, w = args.height, args.width
    K = default_intrinsics(h, w)
    keys = (
        "occluded",
        "visible",
        "outside",
        "leak_plain",
        "leak_refined",
        "fhole_plain",
        "fhole_refined",
        "leak_out_plain",
        "leak_out_refined",
    )
    counts = {k: 0 for k in keys}
    threshold = 0.05 * 704 / h  # the pipeline's resolution-scaled depth-edge threshold (config.edge_threshold)
    factor = max(1, h // 176)  # the pipeline's seam-mesh factor (config.mesh_downsample)
    t_warp, t_refine, n_frames = 0.0, 0.0, 0
    ref_done, ref_time, ref_agree = 0, 0.0, []
    for i in range(args.scenes):
        scene_id = f"proc-{i:06d}"
        seed = derive_seed(args.seed, scene_id)
        scene = make_scene(seed)
        src = scene.render(torch.eye(4)[None], K[None], h, w)
        rgb, depth = src.rgb[0] * 2 - 1, src.depth[0, 0]
        reliable = depth_reliability_mask(depth, 5, threshold)
        points = unproject_depth(depth, K, torch.eye(4))
        for name, spec in LYRA_PATHS.items():
            d = draw_distance(spec, numpy_rng(seed, "trajectory", name), args.distance_factor)
            cams = make_trajectory(name, K, h, w, args.frames, distance=d)
            t0 = time.perf_counter()
            warp = forward_warp(rgb, depth, K, torch.eye(4), cams.K, cams.w2c, source_mask=reliable)
            t1 = time.perf_counter()
            refined = refine_mask_conservative(warp, points, ~reliable, cams.w2c, cams.K, factor=factor)
            t2 = time.perf_counter()
            t_warp += t1 - t0
            t_refine += t2 - t1
            n_frames += len(cams)
            if ref_done < args.reference_frames:
                f = slice(len(cams) - 1, len(cams))  # the frame farthest along the path
                sub = type(warp)(warp.rgb[f], warp.depth[f], warp.mask[f])
                t3 = time.perf_counter()
                ref = refine_mask_conservative(
                    sub, points, ~reliable, cams.w2c[f], cams.K[f], factor=factor, method="reference"
                )
                ref_time += time.perf_counter() - t3
                ref_agree.append(float((ref.mask == refined.mask[f]).float().mean()))
                ref_done += 1
            gt = scene.render(cams.c2w, cams.K, h, w)
            for f in range(1, len(cams)):  # frame 0 is the source itself
                vis, inside, out = source_visibility(scene, gt.depth[f, 0], cams.c2w[f], cams.K[f], K, h, w)
                occ = inside & ~vis  # hidden behind something in the source view (what refinement targets)
                plain, ref_m = warp.mask[f, 0], refined.mask[f, 0]
                counts["outside"] += int(out.sum())
                counts["leak_out_plain"] += int((plain & out).sum())
                counts["leak_out_refined"] += int((ref_m & out).sum())
                counts["occluded"] += int(occ.sum())
                counts["visible"] += int(vis.sum())
                counts["leak_plain"] += int((plain & occ).sum())
                counts["leak_refined"] += int((ref_m & occ).sum())
                counts["fhole_plain"] += int((~plain & vis).sum())
                counts["fhole_refined"] += int((~ref_m & vis).sum())
    occ, vis = max(counts["occluded"], 1), max(counts["visible"], 1)
    leak_p, leak_r = counts["leak_plain"] / occ, counts["leak_refined"] / occ
    fh_p, fh_r = counts["fhole_plain"] / vis, counts["fhole_refined"] / vis
    print(
        f"scenes={args.scenes} paths={len(LYRA_PATHS)} frames={args.frames} size={h}x{w} "
        f"torch_threads={torch.get_num_threads()}"
    )
    total = occ + vis + counts["outside"]
    print(
        f"target pixels: {vis / total:.2%} seen by the source, {occ / total:.2%} occluded in it, "
        f"{counts['outside'] / total:.2%} outside its image"
    )
    print(f"leakage rate     plain {leak_p:.4%}   refined {leak_r:.4%}   reduction {leak_p / max(leak_r, 1e-12):.1f}x")
    print(f"false-hole rate  plain {fh_p:.4%}   refined {fh_r:.4%}")
    out_n = max(counts["outside"], 1)
    print(
        f"outside-source-image pixels marked valid: plain {counts['leak_out_plain'] / out_n:.4%}   "
        f"refined {counts['leak_out_refined'] / out_n:.4%} (background behind unseen near surfaces)"
    )
    print(f"time per frame   warp {t_warp / n_frames * 1e3:.1f} ms   refine (fast) {t_refine / n_frames * 1e3:.1f} ms")
    if ref_done:
        per = ref_time / ref_done
        print(
            f"reference refine {per:.2f} s per frame ({ref_done} frames): {per / (t_refine / n_frames):.0f}x "
            f"slower than fast; mask agreement {np.mean(ref_agree):.6%} (min {min(ref_agree):.6%})"
        )


if __name__ == "__main__":
    main()
