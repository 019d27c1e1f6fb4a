"""Benchmark: fast ``mesh_depth`` (rasterizer) vs ``mesh_depth_reference`` (brute-force Moller-Trumbore).

The seam mesh is built from the synthetic 704x1280 depth map of ``bench_warp`` (boxes in front of a slanted
background and a sky band) and cast from cameras moved sideways along an arc. The full-resolution reference
would take far more than two minutes, so by default it is timed on a band of rows and extrapolated
(printed as such); the fast z-buffer is compared with the reference on those rows.

Run: ``python benchmarks/bench_raycast.py [--height 704 --width 1280 --frames 4 --reference-rows 16]``.
Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_warp import orbit_poses, synthetic_frame

from lyra_ops.mask_refine import mesh_depth, mesh_depth_reference, seam_mesh
from lyra_ops.warp import depth_reliability_mask, unproject_depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=4, help="target cameras (fast op timed on each)")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument(
        "--reference-rows",
        type=int,
        default=16,
        help="rows per frame the reference is run on (0: full image, can take hours)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="fast-op repeats per frame (best is reported)")
    args = parser.parse_args()

    _, depth, K = synthetic_frame(args.height, args.width)
    boundary = ~depth_reliability_mask(depth)
    points = unproject_depth(depth, K, torch.eye(4)).to(torch.float64)
    vertices, faces = seam_mesh(points, boundary, args.factor)
    w2c = orbit_poses(args.frames).to(torch.float64)
    K64 = K.to(torch.float64)
    print(
        f"mesh_depth benchmark: {args.height}x{args.width}, seam mesh of {faces.shape[0]} triangles / "
        f"{vertices.shape[0]} vertices (factor {args.factor}), {args.frames} target frames, "
        f"{torch.get_num_threads()} threads"
    )

    # All fast timings first: in a VM, the reference's large temporaries leave the next allocations of
    # fresh pages slow for a while (first-touch faults), which would be charged to the fast op.
    frames = [vertices @ w2c[f, :3, :3].T + w2c[f, :3, 3] for f in range(args.frames)]
    fast_depths, fast_times = [], []
    for verts_cam in frames:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fast = mesh_depth(verts_cam, faces, K64, args.height, args.width)
            times.append(time.perf_counter() - t0)
        fast_depths.append(fast)
        fast_times.append(min(times))

    ref_times, agree, counted, max_rel, ref_pixels = [], 0, 0, 0.0, 0
    for f, (verts_cam, fast) in enumerate(zip(frames, fast_depths, strict=True)):
        rows = args.height if args.reference_rows <= 0 else min(args.reference_rows, args.height)
        r0 = (args.height - rows) // 2 if f % 2 == 0 else (args.height - rows) // 4  # alternate the bands
        K_band = K64.clone()
        K_band[1, 2] -= r0  # the band [r0, r0 + rows) as an image of its own
        t0 = time.perf_counter()
        ref = mesh_depth_reference(verts_cam, faces, K_band, rows, args.width)
        ref_times.append(time.perf_counter() - t0)
        ref_pixels += ref.numel()

        band = fast[r0 : r0 + rows]
        same_hit = (band > 0) == (ref > 0)
        both = (band > 0) & (ref > 0)
        agree += int(same_hit.sum())
        counted += ref.numel()
        if bool(both.any()):
            max_rel = max(max_rel, float(((band - ref).abs() / ref.abs())[both].max()))
        print(
            f"  frame {f}: fast {1000 * fast_times[f]:7.1f} ms, hit pixels {int((fast > 0).sum())}; "
            f"reference on rows [{r0}, {r0 + rows}): {ref_times[-1]:6.2f} s"
        )

    t_fast = sum(fast_times) / len(fast_times)
    full = args.height * args.width
    t_ref = sum(ref_times) / ref_pixels * full  # seconds per full frame
    label = (
        "measured"
        if ref_pixels == full * args.frames
        else f"EXTRAPOLATED from {ref_pixels // args.frames} px/frame"
    )
    print(f"fast      : {t_fast:8.3f} s per frame (mean of per-frame best of {args.repeats})")
    print(f"reference : {t_ref:8.1f} s per frame ({label})")
    print(f"ratio     : {t_ref / t_fast:8.0f} x")
    print(
        f"agreement : same hit/no-hit on {agree}/{counted} compared pixels ({100 * agree / counted:.4f} %), "
        f"max relative depth difference where both hit {max_rel:.2e}"
    )

    # Scaling check: a mesh over every cell of the grid (the densest seam mesh this factor can give).
    dense_v, dense_f = seam_mesh(points, torch.ones_like(boundary), args.factor)
    verts_cam = dense_v @ w2c[-1, :3, :3].T + w2c[-1, :3, 3]
    times = []
    for _ in range(args.repeats + 2):  # extra repeats: this follows the reference's big allocations
        t0 = time.perf_counter()
        mesh_depth(verts_cam, dense_f, K64, args.height, args.width)
        times.append(time.perf_counter() - t0)
    print(f"dense mesh: {dense_f.shape[0]} triangles (every cell), fast {min(times):.3f} s per frame")


if __name__ == "__main__":
    main()
