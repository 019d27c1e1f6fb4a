"""Benchmark: our ``forward_warp`` against Lyra's warping algorithm as it runs in Lyra, on one synthetic RGB-D frame.

``lyra_algorithm_warp`` below re-implements the reference pipeline's warp step as the spec describes it (section
1.6 and ``cache_3d.py``): frames two at a time, full-frame float32 tensors of batch 2, per-pixel 4x4 and 3x3
matrix products on (b,h,w,4,1) tensors, depth weights normalised by the largest log-depth of the whole
two-frame chunk, four corner ``index_put_(accumulate=True)`` for the colours and four for the weights into an
(H+2)x(W+2) canvas, and the same splat again for the warped depth (the SDG always renders it: foreground
masking is on). Timings are interleaved (ours, Lyra's, ours, ...) at 1 and 2 torch threads in one run, best
of ``--repeats``; also ``forward_warp_reference`` (our float64 loop, the correctness reference) once.

Run: ``python benchmarks/bench_warp.py [--height 704 --width 1280 --frames 8 --json out.json]``. Not a test:
nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lyra_ops.warp import depth_reliability_mask, forward_warp, forward_warp_reference


def synthetic_frame(
    height: int, width: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image (3,H,W) in [-1,1], z-depth (H,W) (a slanted floor-to-wall background at 4-12 with three boxes in
    front at 1.5-3, sky band at 100) and intrinsics (3,3) with a 65 degree horizontal field of view."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(height, dtype=torch.float32)[:, None]
    j = torch.arange(width, dtype=torch.float32)[None, :]
    depth = (12.0 - 8.0 * i / height).expand(height, width).clone()
    depth[: height // 8] = 100.0
    for r0, r1, c0, c1, d in (
        (0.3, 0.7, 0.1, 0.3, 1.5),
        (0.5, 0.9, 0.45, 0.6, 2.2),
        (0.2, 0.6, 0.7, 0.95, 3.0),
    ):
        rows, cols = slice(int(r0 * height), int(r1 * height)), slice(int(c0 * width), int(c1 * width))
        depth[rows, cols] = d + 0.0005 * (j[:, cols] - c0 * width)  # slightly slanted fronto-parallel boxes
    image = torch.stack(
        [
            torch.sin(j / 17.0 + i / 29.0),
            torch.cos(i / 13.0) * torch.sin(j / 41.0),
            0.5 * torch.sin((i + j) / 7.0),
        ]
    )
    image = (image + 0.05 * torch.randn(3, height, width, generator=g)).clamp(-1, 1)
    fx = width / (2 * math.tan(math.radians(65.0) / 2))
    K = torch.tensor([[fx, 0.0, width / 2], [0.0, fx, height / 2], [0.0, 0.0, 1.0]])
    return image, depth, K


def orbit_poses(frames: int, radius: float = 0.4, center_depth: float = 4.0) -> torch.Tensor:
    """w2c (F,4,4): cameras moving sideways along an arc while looking at (0, 0, center_depth)."""
    poses = []
    for f in range(frames):
        angle = math.radians(12.0) * (f + 1) / frames
        eye = torch.tensor(
            [center_depth * math.sin(angle) * radius * 2.5, 0.05 * f, center_depth * (1 - math.cos(angle))]
        )
        target = torch.tensor([0.0, 0.0, center_depth])
        fwd = (target - eye) / (target - eye).norm()
        right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), fwd)
        right = right / right.norm()
        down = torch.linalg.cross(fwd, right)
        R = torch.stack([right, down, fwd])  # rows: camera axes in world
        w2c = torch.eye(4)
        w2c[:3, :3] = R
        w2c[:3, 3] = -R @ eye
        poses.append(w2c)
    return torch.stack(poses)


def lyra_algorithm_warp(image: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor,
                        mask: torch.Tensor, chunk: int = 2, scale: float = 50.0,
                        render_depth: bool = True) -> tuple[torch.Tensor, ...]:
    """Lyra's warp of a source frame (at the identity) into F targets: (rgb (F,3,H,W), mask (F,1,H,W),
    depth (F,1,H,W) or None), computed the way the reference computes it (see the module docstring);
    ``render_depth=False``: the colour splat alone (Lyra without foreground masking)."""
    _, h, w = image.shape
    outs = []
    for s in range(0, w2c.shape[0], chunk):
        poses = w2c[s : s + chunk]
        b = poses.shape[0]
        frame = image[None].expand(b, -1, -1, -1)
        src_mask = mask[None, None].to(image.dtype).expand(b, -1, -1, -1)
        # target pixel positions: K2 [R|t] (d K1^-1 [x, y, 1]) per pixel, as batched 4x4 / 3x3 matrix products
        ys, xs = torch.meshgrid(torch.arange(h, dtype=image.dtype), torch.arange(w, dtype=image.dtype),
                                indexing="ij")
        pix = torch.stack([xs, ys, torch.ones_like(xs)], dim=2)[None, :, :, :, None]  # (1,h,w,3,1)
        rays = torch.matmul(torch.linalg.inv(K)[None, None, None], pix)
        cam = depth[None, :, :, None, None].expand(b, -1, -1, -1, -1) * rays
        cam_h = torch.cat([cam, torch.ones(b, h, w, 1, 1, dtype=image.dtype)], dim=3)
        moved = torch.matmul(poses[:, None, None], cam_h)[:, :, :, :3]
        proj = torch.matmul(K[None, None, None], moved)
        z = proj[:, :, :, 2, 0]
        valid = src_mask * (z > 0)[:, None]
        pos = (proj[:, :, :, :2, 0] / (z[..., None] + 1e-7)).permute(0, 3, 1, 2) + 1  # +1: the padded canvas
        lo, hi = torch.floor(pos).long(), torch.ceil(pos).long()
        pos = torch.stack([pos[:, 0].clamp(0, w + 1), pos[:, 1].clamp(0, h + 1)], dim=1)
        lo = torch.stack([lo[:, 0].clamp(0, w + 1), lo[:, 1].clamp(0, h + 1)], dim=1)
        hi = torch.stack([hi[:, 0].clamp(0, w + 1), hi[:, 1].clamp(0, h + 1)], dim=1)
        fy, fx = pos[:, 1:2] - lo[:, 1:2], pos[:, 0:1] - lo[:, 0:1]
        cy, cx = hi[:, 1:2] - pos[:, 1:2], hi[:, 0:1] - pos[:, 0:1]
        zc = z[:, None].clamp(min=0)
        log_z = torch.log1p(zc)
        depth_w = torch.exp((log_z / (log_z.max() + 1e-7) * scale).clamp(max=80.0)) + 1e-7  # whole-chunk max
        corners = [((1 - fy) * (1 - fx), lo[:, 1], lo[:, 0]), ((1 - cy) * (1 - fx), hi[:, 1], lo[:, 0]),
                   ((1 - fy) * (1 - cx), lo[:, 1], hi[:, 0]), ((1 - cy) * (1 - cx), hi[:, 1], hi[:, 0])]
        batch = torch.arange(b)[:, None, None]
        results = []
        for values in (frame, zc)[: 2 if render_depth else 1]:  # colours, then the warped depth (a second splat)
            c = values.shape[1]
            acc = torch.zeros(b, h + 2, w + 2, c, dtype=image.dtype)
            wsum = torch.zeros(b, h + 2, w + 2, 1, dtype=image.dtype)
            cl = values.permute(0, 2, 3, 1)
            for prox, yy, xx in corners:
                wt = (prox * valid / depth_w).permute(0, 2, 3, 1)
                acc.index_put_((batch, yy, xx), cl * wt, accumulate=True)
                wsum.index_put_((batch, yy, xx), wt, accumulate=True)
            acc, wsum = acc.permute(0, 3, 1, 2)[:, :, 1:-1, 1:-1], wsum.permute(0, 3, 1, 2)[:, :, 1:-1, 1:-1]
            hit = torch.nan_to_num(wsum, nan=1000.0) > 0
            results.append((torch.where(hit, acc / wsum, -1.0 if c == 3 else 0.0), hit))
        (rgb, hit), dep = results[0], results[1][0] if render_depth else None
        outs.append((rgb.clamp(-1, 1), hit.to(image.dtype), dep))
    rgb, hit, dep = zip(*outs, strict=True)
    return torch.cat(rgb), torch.cat(hit), torch.cat(dep) if render_depth else None


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per thread count (best kept)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    image, depth, K = synthetic_frame(args.height, args.width)
    w2c = orbit_poses(args.frames)
    reliable = depth_reliability_mask(depth)
    kwargs = dict(source_mask=reliable)
    print(f"forward_warp benchmark: {args.height}x{args.width}, {args.frames} target frames, "
          f"{int(reliable.sum())} splatted source pixels, torch {torch.__version__}")

    ours = lambda: forward_warp(image, depth, K, torch.eye(4), K, w2c, **kwargs)  # noqa: E731
    lyra = lambda: lyra_algorithm_warp(image, depth, K, w2c, reliable)  # noqa: E731
    plain = lambda: lyra_algorithm_warp(image, depth, K, w2c, reliable, render_depth=False)  # noqa: E731
    fast, theirs = ours(), lyra()  # warm-up, and the outputs compared below
    results = {"size": [args.height, args.width], "frames": args.frames, "torch": torch.__version__, "runs": []}
    previous = torch.get_num_threads()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        t_ours, t_lyra, t_plain = [], [], []
        for _ in range(args.repeats):  # interleaved: all see the same machine state
            t_ours.append(best_time(ours, 1))
            t_lyra.append(best_time(lyra, 1))
            t_plain.append(best_time(plain, 1))
        row = {"threads": threads, "ours_s_per_frame": min(t_ours) / args.frames,
               "lyra_s_per_frame": min(t_lyra) / args.frames, "speedup": min(t_lyra) / min(t_ours),
               "lyra_colour_only_s_per_frame": min(t_plain) / args.frames,
               "speedup_vs_colour_only": min(t_plain) / min(t_ours)}
        results["runs"].append(row)
        print(f"{threads} thread(s): ours (colour + depth) {1000 * row['ours_s_per_frame']:.1f} ms/frame; Lyra's "
              f"algorithm, colour + depth as its SDG runs it {1000 * row['lyra_s_per_frame']:.1f} ms/frame: "
              f"{row['speedup']:.2f}x (target >= 3x); its colour splat alone "
              f"{1000 * row['lyra_colour_only_s_per_frame']:.1f} ms/frame: {row['speedup_vs_colour_only']:.2f}x")
    torch.set_num_threads(previous)

    t0 = time.perf_counter()
    ref = forward_warp_reference(image, depth, K, torch.eye(4), K, w2c, **kwargs)
    t_ref = time.perf_counter() - t0
    agree = fast.mask[:, 0] & theirs[1][:, 0].bool()
    results["vs_reference"] = {
        "reference_s_per_frame": t_ref / args.frames,
        "max_rgb_diff": (fast.rgb - ref.rgb).abs().max().item(),
        "max_depth_diff": (fast.depth - ref.depth).abs().max().item(),
        "mask_mismatches": int((fast.mask != ref.mask).sum()),
    }
    results["vs_lyra"] = {
        "mask_agreement": float((fast.mask[:, 0] == theirs[1][:, 0].bool()).float().mean()),
        "mean_abs_rgb_diff_where_both_valid": float((fast.rgb - theirs[0]).abs().permute(1, 0, 2, 3)[:, agree]
                                                    .mean()),
    }
    alone = forward_warp(image, depth, K, torch.eye(4), K, w2c[-1:], **kwargs)
    results["batch_independent"] = bool(torch.equal(alone.rgb[0], fast.rgb[-1]) and
                                        torch.equal(alone.depth[0], fast.depth[-1]))
    ref_row = results["vs_reference"]
    print(f"our float64 reference: {1000 * t_ref / args.frames:.0f} ms/frame; max |rgb diff| "
          f"{ref_row['max_rgb_diff']:.1e}, max |depth diff| {ref_row['max_depth_diff']:.1e}, "
          f"mask mismatches {ref_row['mask_mismatches']}")
    print(f"vs Lyra's algorithm: masks agree on {100 * results['vs_lyra']['mask_agreement']:.2f}% of pixels, mean "
          f"|rgb diff| where both valid {results['vs_lyra']['mean_abs_rgb_diff_where_both_valid']:.1e} (Lyra "
          "normalises depth weights over two frames and gives exact-integer points 4x weight; we do neither)")
    print(f"last frame alone == in batch (bit-identical): {results['batch_independent']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
