"""Benchmark: our ``forward_warp`` (and warp + conservative masking) against Lyra's own code, on one synthetic
RGB-D frame.

Lyra's code is Lyra-1's ``forward_warp`` (``cosmos_predict1/diffusion/inference/forward_warp_utils_pytorch.py``)
and its NVIDIA Warp ray-cast kernel, loaded at run time from a local copy of the public repository nv-tlabs/lyra
(``lyra_reference.py`` says how to get one; without it the Lyra columns are skipped). It is called as Lyra's SDG
calls it (``Cache3D_Base.render_cache``): target frames two at a time, world points of the source pixels
(``world_points1``), the depth-reliability mask as ``mask1``, three modes:

* colour only: ``render_depth=False`` (Lyra without foreground masking);
* with the depth splat: ``render_depth=True`` (colour, mask and warped depth, what ours always returns);
* warp + conservative masking: ``foreground_masking=True`` with the seam ``boundary_mask`` (its SDG's setting;
  the depth is splatted too). Ours: ``forward_warp`` then ``refine_mask_conservative`` (factor 4, 0.02).

Same inputs for both: the same world points, source mask and seam mask (ours: ``~depth_reliability_mask``),
poses and intrinsics; Lyra's warper puts pixel (i, j) at integer coordinates and ours at (j + 0.5, i + 0.5),
so Lyra is given the intrinsics with the principal point moved by -0.5 px: both then splat every point at the
same place and cast the same rays. Timings are interleaved (ours, Lyra's, ours, ...) at 1 and 2 torch threads,
medians of ``--repeats`` per frame, with ``os.getloadavg()``; Lyra's masking takes ~25 s a frame on a CPU (one
thread: Warp's CPU backend is serial), so it is timed on the last ``--mask-frames`` targets, ours on the same.

Ours runs its C kernel (``lyra_ops/_warp_cpu.c``) where a compiler is available; ``--torch-path`` also times our
pure torch path (``LYRA_WARP_KERNEL=torch``, the code before the kernel), interleaved with the rest.

Run: ``python benchmarks/bench_warp.py [--reference PATH] [--height 704 --width 1280 --frames 8 --mask-frames 1
--torch-path --json out]``. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lyra_reference  # noqa: E402

from lyra_ops import warp_kernel  # noqa: E402
from lyra_ops.mask_refine import refine_mask_conservative  # noqa: E402
from lyra_ops.warp import (  # noqa: E402
    WarpResult,
    depth_reliability_mask,
    forward_warp,
    forward_warp_reference,
    unproject_depth,
)


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


class LyraInputs:
    """Lyra's arguments for one two-frame chunk, prepared once (as ``Cache3D_Base`` prepares its caches)."""

    def __init__(self, image: torch.Tensor, points: torch.Tensor, K: torch.Tensor, reliable: torch.Tensor,
                 chunk: int = 2) -> None:
        h, w = reliable.shape
        self.chunk = chunk
        self.image = image[None].expand(chunk, -1, -1, -1).contiguous()
        self.mask = reliable[None, None].float().expand(chunk, -1, -1, -1).contiguous()
        self.points = points.float()[None].expand(chunk, -1, -1, -1).contiguous()
        self.boundary = (~reliable)[None].expand(chunk, -1, -1).contiguous()
        K_int = K.clone().float()
        K_int[0, 2] -= 0.5  # Lyra's pixel (i, j) sits at (j, i): shift the principal point by half a pixel
        K_int[1, 2] -= 0.5
        self.K = K_int[None].expand(chunk, -1, -1).contiguous()


def lyra_warp(ref: lyra_reference.Reference, inp: LyraInputs, w2c: torch.Tensor, mode: str) -> WarpResult:
    """Lyra's ``forward_warp`` over the frames of ``w2c``, two at a time; mode "colour", "depth" or "masking".
    Returns its colour, mask (as bool) and depth (zeros in colour mode)."""
    rgb, mask, depth = [], [], []
    for s in range(0, w2c.shape[0], inp.chunk):
        pose = w2c[s : s + inp.chunk].float()
        b = pose.shape[0]
        out_rgb, out_mask, out_depth, _ = ref.warp_utils.forward_warp(
            inp.image[:b], mask1=inp.mask[:b], depth1=None, transformation1=None, transformation2=pose,
            intrinsic1=inp.K[:b], intrinsic2=inp.K[:b], render_depth=mode == "depth",
            world_points1=inp.points[:b], foreground_masking=mode == "masking",
            boundary_mask=inp.boundary[:b] if mode == "masking" else None,
        )
        rgb.append(out_rgb)
        mask.append(out_mask > 0)
        depth.append(out_depth[:, None] if out_depth is not None else torch.zeros_like(out_mask))
    return WarpResult(torch.cat(rgb), torch.cat(depth), torch.cat(mask))


def compare(ours: WarpResult, theirs: WarpResult) -> dict[str, float]:
    """Mask agreement and colour difference where both are valid."""
    both = ours.mask[:, 0] & theirs.mask[:, 0]
    diff = (ours.rgb.clamp(-1, 1) - theirs.rgb).abs().permute(1, 0, 2, 3)[:, both]
    return {"mask_agreement": float((ours.mask == theirs.mask).float().mean()),
            "ours_only_px_per_frame": float((ours.mask & ~theirs.mask).sum()) / ours.num_frames,
            "lyra_only_px_per_frame": float((~ours.mask & theirs.mask).sum()) / ours.num_frames,
            "mean_abs_rgb_diff_where_both_valid": float(diff.mean()) if diff.numel() else 0.0,
            "p99_abs_rgb_diff_where_both_valid": float(diff.max(0).values.quantile(0.99)) if diff.numel() else 0.0}


def removed_agreement(ours_plain: WarpResult, ours_masked: WarpResult, lyra_depth: WarpResult,
                      lyra_masked: WarpResult) -> dict[str, float]:
    """How the pixels each masking removes compare: counts per frame and their intersection over union."""
    ours = ours_plain.mask & ~ours_masked.mask
    theirs = lyra_depth.mask & ~lyra_masked.mask
    union = int((ours | theirs).sum())
    return {"ours_removed_px_per_frame": float(ours.sum()) / ours.shape[0],
            "lyra_removed_px_per_frame": float(theirs.sum()) / ours.shape[0],
            "removed_iou": float((ours & theirs).sum()) / union if union else 1.0}


def torch_path(fn):
    """``fn()`` on our pure torch path (the C kernel switched off)."""
    previous = os.environ.get("LYRA_WARP_KERNEL")
    os.environ["LYRA_WARP_KERNEL"] = "torch"
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ["LYRA_WARP_KERNEL"]
        else:
            os.environ["LYRA_WARP_KERNEL"] = previous


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=None,
                        help=f"copy of nv-tlabs/lyra (default $LYRA_REFERENCE or {lyra_reference.DEFAULT_PATH})")
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--mask-frames", type=int, default=2, help="last targets on which the masking is timed")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per thread count (medians)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--torch-path", action="store_true",
                        help="also time our pure torch path (LYRA_WARP_KERNEL=torch), interleaved")
    args = parser.parse_args()
    if not 1 <= args.mask_frames <= args.frames:
        parser.error(f"--mask-frames must be in [1, --frames = {args.frames}], got {args.mask_frames}")

    image, depth, K = synthetic_frame(args.height, args.width)
    w2c = orbit_poses(args.frames)
    reliable = depth_reliability_mask(depth)
    points = unproject_depth(depth, K, torch.eye(4))
    ref = lyra_reference.load_or_explain(args.reference)
    print(f"forward_warp benchmark: {args.height}x{args.width}, {args.frames} target frames, "
          f"{int(reliable.sum())} splatted source pixels, {int((~reliable).sum())} seam pixels, "
          f"torch {torch.__version__}; Lyra: "
          + (f"nv-tlabs/lyra {ref.commit} from {ref.path}" + (" (Warp kernel on the CPU)" if ref.cpu_kernel_proxy
                                                               else "") if ref else "skipped"))
    sub = slice(args.frames - args.mask_frames, args.frames)

    def ours_plain(poses=w2c):
        return forward_warp(image, depth, K, torch.eye(4), K, poses, source_mask=reliable)

    def ours_masked(poses=w2c):
        return refine_mask_conservative(ours_plain(poses), points, ~reliable, poses, K, factor=4, threshold=0.02)

    jobs = {"ours_plain": (ours_plain, args.frames), "ours_masked": (ours_masked, args.frames),
            "ours_masked_sub": (lambda: ours_masked(w2c[sub]), args.mask_frames)}
    if args.torch_path and warp_kernel.kernel() is not None:  # before / after the C kernel, in the same run
        jobs |= {"ours_torch_plain": (lambda: torch_path(ours_plain), args.frames),
                 "ours_torch_masked": (lambda: torch_path(ours_masked), args.frames)}
    if ref is not None:
        inp = LyraInputs(image, points, K, reliable)
        jobs |= {"lyra_colour": (lambda: lyra_warp(ref, inp, w2c, "colour"), args.frames),
                 "lyra_depth": (lambda: lyra_warp(ref, inp, w2c, "depth"), args.frames),
                 "lyra_masked_sub": (lambda: lyra_warp(ref, inp, w2c[sub], "masking"), args.mask_frames)}
    outputs = {name: fn() for name, (fn, _) in jobs.items()}  # warm-up (Warp compiles its kernel), and outputs
    results = {"size": [args.height, args.width], "frames": args.frames, "mask_frames": args.mask_frames,
               "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "ours_kernel": "C (lyra_ops/_warp_cpu.c)" if warp_kernel.kernel() is not None else "torch",
               "lyra": {"repository": "nv-tlabs/lyra", "commit": ref.commit, "warp_kernel_on_cpu":
                        ref.cpu_kernel_proxy} if ref else None, "runs": []}
    previous = torch.get_num_threads()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {name: [] for name in jobs}
        cpu: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.repeats):  # interleaved: ours, Lyra's, ... all see the same machine state
            for name, (fn, n) in jobs.items():
                c0 = time.process_time()
                times[name].append(timed(fn)[0] / n)
                cpu[name].append((time.process_time() - c0) / n)
        # Wall-clock medians, and the process's CPU time (all its threads): on a shared machine the wall clock
        # of a 1-thread job is its CPU time stretched by the load, so 1-thread ratios are also given on CPU time.
        row = {"threads": threads, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               **{f"{name}_s_per_frame": statistics.median(t) for name, t in times.items()},
               "cpu_s_per_frame": {name: statistics.median(t) for name, t in cpu.items()},
               "all_s_per_frame": times}
        med_cpu = row["cpu_s_per_frame"]
        row["cpu_ratios"] = {"masked_over_plain": med_cpu["ours_masked"] / med_cpu["ours_plain"]}
        if ref is not None:
            row["cpu_ratios"] |= {"vs_colour_only": med_cpu["lyra_colour"] / med_cpu["ours_plain"],
                                  "vs_depth_splat": med_cpu["lyra_depth"] / med_cpu["ours_plain"],
                                  "masking": med_cpu["lyra_masked_sub"] / med_cpu["ours_masked_sub"]}
        if "ours_torch_plain" in jobs:
            row["cpu_ratios"] |= {"kernel_speedup_plain": med_cpu["ours_torch_plain"] / med_cpu["ours_plain"],
                                  "kernel_speedup_masked": med_cpu["ours_torch_masked"] / med_cpu["ours_masked"]}
        row["masked_over_plain"] = row["ours_masked_s_per_frame"] / row["ours_plain_s_per_frame"]
        if "ours_torch_plain" in jobs:
            row["kernel_speedup_plain"] = row["ours_torch_plain_s_per_frame"] / row["ours_plain_s_per_frame"]
            row["kernel_speedup_masked"] = row["ours_torch_masked_s_per_frame"] / row["ours_masked_s_per_frame"]
            row["torch_path_masked_over_plain"] = (row["ours_torch_masked_s_per_frame"]
                                                   / row["ours_torch_plain_s_per_frame"])
        line = (f"{threads} thread(s) (load {load_before[0]:.1f} -> {row['loadavg_after'][0]:.1f}): ours "
                f"{1000 * row['ours_plain_s_per_frame']:.1f} ms/frame, + masking "
                f"{1000 * row['ours_masked_s_per_frame']:.1f} ({row['masked_over_plain']:.2f}x plain)")
        if "ours_torch_plain" in jobs:
            line += (f"; torch path {1000 * row['ours_torch_plain_s_per_frame']:.1f} ms/frame, + masking "
                     f"{1000 * row['ours_torch_masked_s_per_frame']:.1f}")
        if ref is not None:
            row["speedup_vs_colour_only"] = row["lyra_colour_s_per_frame"] / row["ours_plain_s_per_frame"]
            row["speedup_vs_depth_splat"] = row["lyra_depth_s_per_frame"] / row["ours_plain_s_per_frame"]
            row["speedup_masking"] = row["lyra_masked_sub_s_per_frame"] / row["ours_masked_sub_s_per_frame"]
            line += (f"; Lyra colour only {1000 * row['lyra_colour_s_per_frame']:.1f} ms/frame "
                     f"({row['speedup_vs_colour_only']:.2f}x, goal >= 3), with the depth splat "
                     f"{1000 * row['lyra_depth_s_per_frame']:.1f} ({row['speedup_vs_depth_splat']:.2f}x); "
                     f"warp + masking on {args.mask_frames} frame(s): Lyra "
                     f"{row['lyra_masked_sub_s_per_frame']:.2f} s/frame, ours "
                     f"{1000 * row['ours_masked_sub_s_per_frame']:.1f} ms ({row['speedup_masking']:.0f}x, goal >= 300)")
        results["runs"].append(row)
        print(line)
        print("  CPU-time ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_ratios"].items()))
    torch.set_num_threads(previous)

    fast = outputs["ours_plain"]
    t_ref, slow = timed(lambda: forward_warp_reference(image, depth, K, torch.eye(4), K, w2c, source_mask=reliable))
    results["vs_our_reference"] = {
        "reference_s_per_frame": t_ref / args.frames,
        "max_rgb_diff": (fast.rgb - slow.rgb).abs().max().item(),
        "max_depth_diff": (fast.depth - slow.depth).abs().max().item(),
        "mask_mismatches": int((fast.mask != slow.mask).sum()),
    }
    alone = forward_warp(image, depth, K, torch.eye(4), K, w2c[-1:], source_mask=reliable)
    results["batch_independent"] = bool(torch.equal(alone.rgb[0], fast.rgb[-1]) and
                                        torch.equal(alone.depth[0], fast.depth[-1]))
    r = results["vs_our_reference"]
    print(f"our float64 reference: max |rgb diff| {r['max_rgb_diff']:.1e}, max |depth diff| "
          f"{r['max_depth_diff']:.1e}, mask mismatches {r['mask_mismatches']}; last frame alone == in batch "
          f"(bit-identical): {results['batch_independent']}")
    if ref is not None:
        masked_sub = outputs["ours_masked_sub"]
        plain_sub = WarpResult(fast.rgb[sub], fast.depth[sub], fast.mask[sub])
        lyra_depth_sub = outputs["lyra_depth"]
        lyra_depth_sub = WarpResult(lyra_depth_sub.rgb[sub], lyra_depth_sub.depth[sub], lyra_depth_sub.mask[sub])
        results["vs_lyra"] = {
            "colour_only": compare(fast, outputs["lyra_colour"]),
            "masking": compare(masked_sub, outputs["lyra_masked_sub"]),
            "masking_removed": removed_agreement(plain_sub, masked_sub, lyra_depth_sub, outputs["lyra_masked_sub"]),
        }
        both = fast.mask & outputs["lyra_depth"].mask
        results["vs_lyra"]["depth_splat_mean_abs_depth_diff_where_both_valid"] = float(
            (fast.depth - outputs["lyra_depth"].depth).abs()[both].mean())
        v = results["vs_lyra"]
        print(f"vs Lyra's output, plain warp: masks agree on {100 * v['colour_only']['mask_agreement']:.3f}% of "
              f"pixels, mean |rgb diff| where both valid {v['colour_only']['mean_abs_rgb_diff_where_both_valid']:.1e}"
              f" (p99 {v['colour_only']['p99_abs_rgb_diff_where_both_valid']:.1e}); with masking: masks agree on "
              f"{100 * v['masking']['mask_agreement']:.3f}%, removed pixels per frame ours "
              f"{v['masking_removed']['ours_removed_px_per_frame']:.0f} / Lyra "
              f"{v['masking_removed']['lyra_removed_px_per_frame']:.0f} "
              f"(IoU {v['masking_removed']['removed_iou']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
