"""Benchmark: fast ``forward_warp`` vs ``forward_warp_reference`` on a synthetic RGB-D frame.

Run: ``python benchmarks/bench_warp.py [--height 704 --width 1280 --frames 8]``. Prints both times, their
ratio and the fast-vs-reference differences. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="fast-op repeats (best time is reported)")
    args = parser.parse_args()

    image, depth, K = synthetic_frame(args.height, args.width)
    w2c = orbit_poses(args.frames)
    reliable = depth_reliability_mask(depth)
    kwargs = dict(source_mask=reliable)
    print(
        f"forward_warp benchmark: {args.height}x{args.width}, {args.frames} target frames, "
        f"{int(reliable.sum())} splatted source pixels, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    forward_warp(image, depth, K, torch.eye(4), K, w2c[:1], **kwargs)  # warm-up
    fast_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fast = forward_warp(image, depth, K, torch.eye(4), K, w2c, **kwargs)
        fast_times.append(time.perf_counter() - t0)
    t_fast = min(fast_times)

    t0 = time.perf_counter()
    ref = forward_warp_reference(image, depth, K, torch.eye(4), K, w2c, **kwargs)
    t_ref = time.perf_counter() - t0

    rgb_diff = (fast.rgb - ref.rgb).abs().max().item()
    depth_diff = (fast.depth - ref.depth).abs().max().item()
    mask_diff = int((fast.mask != ref.mask).sum())
    alone = forward_warp(image, depth, K, torch.eye(4), K, w2c[-1:], **kwargs)
    batch_independent = torch.equal(alone.rgb[0], fast.rgb[-1])
    batch_independent &= torch.equal(alone.depth[0], fast.depth[-1])

    per_frame = 1000 * t_fast / args.frames
    print(f"fast      : {t_fast:8.3f} s  ({per_frame:.1f} ms/frame, best of {args.repeats})")
    print(f"reference : {t_ref:8.3f} s  ({1000 * t_ref / args.frames:.1f} ms/frame)")
    print(f"ratio     : {t_ref / t_fast:8.1f} x   (target >= 3x)")
    print(f"max |rgb diff|   : {rgb_diff:.3e}   (target < 1e-4)")
    print(f"max |depth diff| : {depth_diff:.3e}   (target < 1e-4)")
    print(
        f"mask mismatches  : {mask_diff} of {fast.mask.numel()} pixels; "
        f"valid fraction {fast.mask.float().mean().item():.3f}"
    )
    print(f"last frame alone == in batch (bit-identical): {batch_independent}")


if __name__ == "__main__":
    main()
