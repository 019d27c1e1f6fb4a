"""Benchmark: the per-scene optimisation baseline (the quality ceiling the feed-forward decoder is compared to).

For each procedural scene, renders Lyra's six trajectories (``LYRA_PATHS``, distances from ``draw_distance``
with a generator seeded by the scene seed) exactly, trains 3D Gaussians on every other frame (frame 0, shared
by all paths, once) and evaluates PSNR on the held-out odd frames against the exact renders, for the RGB-D
initialisation and for the optimised Gaussians. Printed, never asserted.

    python benchmarks/bench_optimize.py                          # 2 scenes, 96x160, 9 frames/path, 300 steps
    python benchmarks/bench_optimize.py --scenes 0 --steps 1000 --no-densify --threads 1

Initialisation: one Gaussian per ``--stride``-th pixel of the exact RGB-D of frame 0 and of the last training
frame of each path (``--init-frames all`` uses every training frame), subsampled to ``--init-points``,
opacity 0.9 and scale 0.3 x pixel footprint; densification on (the settings that measured best on scene 0).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_ops.cameras import Cameras, default_intrinsics  # noqa: E402
from lyra_ops.gaussians import Gaussians  # noqa: E402
from lyra_ops.metrics import psnr  # noqa: E402
from lyra_ops.optimize import (  # noqa: E402
    OptimizeConfig,
    init_gaussians_from_rgbd,
    optimize_scene,
    render_views,
)
from lyra_ops.scenes import make_scene  # noqa: E402
from lyra_ops.trajectories import LYRA_PATHS, draw_distance, make_trajectory  # noqa: E402


def build_views(seed: int, height: int, width: int, frames: int) -> tuple[Cameras, list[str], list[int]]:
    """All frames of the six paths (frame 0 once): cameras, path name of each view, frame index of each view."""
    k = default_intrinsics(height, width)
    rng = np.random.default_rng(seed)
    c2w, names, index = [], [], []
    for name, spec in LYRA_PATHS.items():
        cams = make_trajectory(name, k, height, width, frames, distance=draw_distance(spec, rng))
        first = 0 if not c2w else 1
        c2w.append(cams.c2w[first:])
        names += [name] * (frames - first)
        index += list(range(first, frames))
    c2w_all = torch.cat(c2w)
    return Cameras(c2w_all, k.expand(c2w_all.shape[0], 3, 3).clone(), height, width), names, index


def run_scene(seed: int, args: argparse.Namespace) -> dict[str, float]:
    cams, names, index = build_views(seed, args.height, args.width, args.frames)
    t0 = time.perf_counter()
    gt = make_scene(seed).render(cams.c2w, cams.K, args.height, args.width)
    render_s = time.perf_counter() - t0
    train = torch.tensor([i for i, f in enumerate(index) if f % 2 == 0])
    held = torch.tensor([i for i, f in enumerate(index) if f % 2 == 1])
    last_even = (args.frames - 1) // 2 * 2
    if args.init_frames == "all":
        init_views = train.tolist()
    else:
        init_views = [0] + [i for i, f in enumerate(index) if f == last_even and f > 0]
    init = Gaussians.cat([
        init_gaussians_from_rgbd(gt.rgb[i], gt.depth[i, 0], cams.K[i], cams.c2w[i], stride=args.stride,
                                 opacity=args.opacity, scale_factor=args.scale_factor)
        for i in init_views
    ])  # fmt: skip
    config = OptimizeConfig(
        steps=args.steps, batch_views=args.batch_views, init_points=args.init_points, densify=not args.no_densify,
        depth_weight=0.0 if args.no_depth else 0.2, seed=seed, **args.set,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    init_eval = init
    if config.init_points is not None and init.num > config.init_points:  # the subset optimize_scene starts from
        init_eval = init.index(torch.randperm(init.num, generator=gen)[: config.init_points].sort().values)
    result = optimize_scene(
        gt.rgb[train], cams[train], init, config, depths=None if args.no_depth else gt.depth[train]
    )
    held_cams = cams[held]
    p_init = psnr(render_views(init_eval, held_cams).rgb, gt.rgb[held])
    p_opt = psnr(render_views(result.gaussians, held_cams).rgb, gt.rgb[held])
    p_train = psnr(render_views(result.gaussians, cams[train]).rgb, gt.rgb[train])
    per_path = {}
    for name in LYRA_PATHS:
        sel = [j for j, i in enumerate(held.tolist()) if names[i] == name]
        per_path[name] = (float(p_init[sel].mean()), float(p_opt[sel].mean()))
    print(f"scene {seed}: {len(train)} train / {len(held)} held-out views at {args.height}x{args.width} "
          f"(exact renders {render_s:.1f} s); {init_eval.num} -> {result.gaussians.num} Gaussians")
    for name, (a, b) in per_path.items():
        print(f"    {name:>10}: held-out PSNR init {a:6.2f} dB -> optimised {b:6.2f} dB")
    s_per_step = result.seconds / max(len(result.losses), 1)
    print(f"  held-out PSNR init {float(p_init.mean()):.2f} dB -> optimised {float(p_opt.mean()):.2f} dB "
          f"(train views {float(p_train.mean()):.2f} dB); loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
          f"{len(result.losses)} steps in {result.seconds:.1f} s = {s_per_step:.3f} s/step")
    return {"init": float(p_init.mean()), "opt": float(p_opt.mean()), "train": float(p_train.mean()),
            "s_per_step": s_per_step}  # fmt: skip


def _override(text: str) -> tuple[str, object]:
    """Parse FIELD=VALUE for an OptimizeConfig field (value as int, float, bool or None when it parses so)."""
    key, sep, value = text.partition("=")
    if not sep or key not in OptimizeConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with an OptimizeConfig field, got {text!r}")
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(value.lower(), value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--frames", type=int, default=9, help="frames per trajectory (even = train, odd = held out)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-views", type=int, default=1)
    ap.add_argument("--stride", type=int, default=2, help="init: keep every stride-th pixel")
    ap.add_argument("--opacity", type=float, default=0.9, help="init opacity")
    ap.add_argument("--scale-factor", type=float, default=0.3, help="init scale = factor * depth / fx * stride")
    ap.add_argument("--init-frames", choices=["ends", "all"], default="ends")
    ap.add_argument("--init-points", type=int, default=None)
    ap.add_argument("--no-densify", action="store_true", help="disable clone/split densification")
    ap.add_argument("--no-depth", action="store_true", help="drop the 0.2 SSI depth loss")
    ap.add_argument("--set", type=_override, nargs="*", default=[], metavar="FIELD=VALUE",
                    help="other OptimizeConfig fields, e.g. --set lr_scales=0.02 densify_grad_threshold=0.1")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on busy cores)")
    args = ap.parse_args()
    args.set = dict(args.set)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_optimize: {vars(args)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [run_scene(seed, args) for seed in args.scenes]
    print(f"mean over {len(rows)} scenes: held-out PSNR init {statistics.mean(r['init'] for r in rows):.2f} dB -> "
          f"optimised {statistics.mean(r['opt'] for r in rows):.2f} dB "
          f"(train {statistics.mean(r['train'] for r in rows):.2f} dB), "
          f"{statistics.mean(r['s_per_step'] for r in rows):.3f} s/step")


if __name__ == "__main__":
    main()
