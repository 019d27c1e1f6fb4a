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
import os
import time
from collections import Counter

import numpy as np
import torch

from lyra_ops import warp_kernel
from lyra_ops.cameras import default_intrinsics
from lyra_ops.mask_refine import refine_mask_conservative
from lyra_ops.metrics import mask_confusion, source_visibility
from lyra_ops.scenes import make_scene
from lyra_ops.seeding import derive_seed, numpy_rng
from lyra_ops.trajectories import LYRA_PATHS, draw_distance, make_trajectory
from lyra_ops.warp import depth_reliability_mask, forward_warp, unproject_depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=176)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distance-factor", type=float, default=1.0, help="Lyra's total_movement_distance_factor")
    ap.add_argument("--reference-frames", type=int, default=0, help="frames to also refine with the reference")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (pinned; also the C kernel's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = args.height, args.width
    K = default_intrinsics(h, w)
    plain_tot: Counter[str] = Counter()  # summed mask_confusion counts of the plain splat mask
    ref_tot: Counter[str] = Counter()  # ... and of the refined mask
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
                vis = source_visibility(scene, gt.depth[f, 0], cams.c2w[f], cams.K[f], K)
                plain_tot.update(mask_confusion(warp.mask[f, 0], vis))
                ref_tot.update(mask_confusion(refined.mask[f, 0], vis))
    occ, vis, outside = max(plain_tot["occluded"], 1), max(plain_tot["seen"], 1), plain_tot["outside"]
    leak_p, leak_r = plain_tot["leak"] / occ, ref_tot["leak"] / occ
    fh_p, fh_r = plain_tot["false_hole"] / vis, ref_tot["false_hole"] / vis
    print(
        f"scenes={args.scenes} paths={len(LYRA_PATHS)} frames={args.frames} size={h}x{w} "
        f"torch_threads={torch.get_num_threads()} kernel={'C' if warp_kernel.kernel() is not None else 'torch'} "
        f"loadavg={os.getloadavg()[0]:.1f}"
    )
    total = occ + vis + outside
    print(
        f"target pixels: {vis / total:.2%} seen by the source, {occ / total:.2%} occluded in it, "
        f"{outside / total:.2%} outside its image"
    )
    reduction = f"{leak_p / leak_r:.1f}x" if leak_r > 0 else "every leaked pixel removed"
    print(f"leakage rate     plain {leak_p:.4%}   refined {leak_r:.4%}   reduction {reduction}")
    oi = max(plain_tot["occluded_interior"], 1)
    print(f"  of which interior (> 1 px from any seen pixel: leak-through, not silhouette rims): "
          f"plain {plain_tot['leak_interior'] / oi:.4%}   refined {ref_tot['leak_interior'] / oi:.4%}")
    print(f"false-hole rate  plain {fh_p:.4%}   refined {fh_r:.4%}")
    out_n = max(outside, 1)
    print(
        f"outside-source-image pixels marked valid: plain {plain_tot['outside_valid'] / out_n:.4%}   "
        f"refined {ref_tot['outside_valid'] / out_n:.4%} (background behind unseen near surfaces)"
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
