"""Benchmark: per-scene refinement (`lyra refine`) from the decoder's Gaussians vs from the RGB-D point cloud.

For each held-out procedural scene of a store (seeds the decoder never trained on), runs exactly what
`lyra refine` runs (``lyra_pipeline.refine``: the same targets, initialisations and ``SceneOptimizer`` config) for
``--steps`` steps from both initialisations, and every ``--eval-every`` steps scores the Gaussians at the scene's
8 held-out cameras (``lyra_pipeline.quality.held_out_targets``: seeded random poses no model saw, exact renders)
and on the path frames (every 4th frame of each trajectory, exact renders), over the input's mean colour like
``bench_distill.py``. Also: PSNR at the held-out cameras over white and over mid grey before and after (does the
scene look the same over a viewer's background?), and the steps each initialisation needs to reach each of
``--targets`` dB at the held-out cameras. Nothing is written to the store; results go to ``--out`` (JSON).

    python benchmarks/bench_refine.py --store d40 --scenes proc-000015,proc-000017,proc-000025 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_ops.baselines import depth_absrel  # noqa: E402
from lyra_ops.metrics import psnr  # noqa: E402
from lyra_ops.optimize import SceneOptimizer  # noqa: E402
from lyra_pipeline.quality import (  # noqa: E402
    QualitySettings,
    held_out_targets,
    load_scene_inputs,
    path_targets,
    render_gaussians,
    scene_background,
)
from lyra_pipeline.reconstruct import load_decoder  # noqa: E402
from lyra_pipeline.refine import GREY, WHITE, RefineConfig, initial_gaussians, scene_targets  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import ViewCache, procedural_world, scene_trajectories  # noqa: E402


def score(g, targets, background) -> dict[str, float]:
    out = render_gaussians(g, targets.cameras, background=background)
    return {"psnr": float(psnr(out.rgb, targets.gt).mean()),
            "depth_absrel": float(depth_absrel(out.depth, targets.depth, out.alpha).mean())}


def over(g, targets, colour) -> float:
    out = render_gaussians(g, targets.cameras, background=torch.tensor(colour))
    return float(psnr(out.rgb, targets.gt).mean())


def run_scene(store: RunStore, scene_id: str, model, source: str, args: argparse.Namespace) -> dict:
    trajectories = scene_trajectories(store, scene_id)
    views = ViewCache(store, size=len(trajectories))
    world = procedural_world(store, scene_id)
    if world is None:
        raise SystemExit(f"{scene_id} is not a procedural scene (no exact ground truth)")
    settings = QualitySettings()
    inputs = load_scene_inputs(store, scene_id, trajectories, views, world)
    held, path = held_out_targets(inputs, settings), path_targets(inputs, settings.path_stride)
    background = scene_background(inputs, settings)
    config = RefineConfig(steps=args.steps, background=args.background)
    targets = scene_targets(views, scene_id, trajectories, config.frame_stride)
    inits = {}
    for name in ("decoder", "rgbd"):  # exactly what `lyra refine --init <name>` starts from
        t0 = time.perf_counter()
        init = initial_gaussians(views, scene_id, trajectories, replace(config, init=name), model)
        inits[name] = (init, time.perf_counter() - t0)
    out = {"scene": scene_id, "fitted_frames": len(targets.picks), "inits": {}}
    for name, (init, build_s) in inits.items():
        opt = SceneOptimizer(targets.fit_frames, targets.fit_cameras, init, config.optimize_config(),
                             depths=targets.fit_depths)
        curve, seconds = [], 0.0
        for step in [0, *range(args.eval_every, args.steps + 1, args.eval_every)]:
            t0 = time.perf_counter()
            opt.run(step)
            seconds += time.perf_counter() - t0
            g = opt.gaussians()
            h, p = score(g, held, background), score(g, path, background)
            curve.append({"step": step, "seconds": seconds, "gaussians": g.num, "held_out_psnr": h["psnr"],
                          "held_out_depth_absrel": h["depth_absrel"], "path_psnr": p["psnr"],
                          "path_depth_absrel": p["depth_absrel"]})
            print(f"  {scene_id} {name:>7} step {step:4d} ({seconds:6.1f} s, {g.num} Gaussians): held-out "
                  f"{h['psnr']:.2f} dB depth {h['depth_absrel']:.3f}; path {p['psnr']:.2f} dB", flush=True)
            if step == 0:
                bg_before = {"white": over(g, held, WHITE), "grey": over(g, held, GREY)}
        bg_after = {"white": over(g, held, WHITE), "grey": over(g, held, GREY)}
        reach = {str(t): next((c["step"] for c in curve if c["held_out_psnr"] >= t), None) for t in args.targets}
        out["inits"][name] = {"build_seconds": build_s, "init_gaussians": init.num, "curve": curve,
                              "held_out_over_white_grey_before": bg_before, "held_out_over_white_grey_after": bg_after,
                              "steps_to_reach": reach}
    return out


def summarize(scenes: list[dict], targets: list[float]) -> None:
    print("\nheld-out cameras (exact renders), mean over scenes:")
    for name in ("decoder", "rgbd"):
        curves = [s["inits"][name]["curve"] for s in scenes]
        first, last = [c[0] for c in curves], [c[-1] for c in curves]

        def mean(rows, key):
            return statistics.mean(r[key] for r in rows)

        print(f"  init {name:>7}: before {mean(first, 'held_out_psnr'):.2f} dB "
              f"(depth {mean(first, 'held_out_depth_absrel'):.3f}) -> after {last[0]['step']} steps "
              f"{mean(last, 'held_out_psnr'):.2f} dB (depth "
              f"{mean(last, 'held_out_depth_absrel'):.3f}); path {mean(first, 'path_psnr'):.2f} -> "
              f"{mean(last, 'path_psnr'):.2f} dB; {mean(last, 'seconds'):.0f} s")
        for kind in ("before", "after"):
            rows = [s["inits"][name][f"held_out_over_white_grey_{kind}"] for s in scenes]
            print(f"      over white / grey {kind}: {statistics.mean(r['white'] for r in rows):.2f} / "
                  f"{statistics.mean(r['grey'] for r in rows):.2f} dB")
        for t in targets:
            steps = [s["inits"][name]["steps_to_reach"][str(t)] for s in scenes]
            print(f"      steps to reach {t} dB held-out: {steps}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--scenes", default="proc-000015,proc-000017,proc-000025,proc-000028")
    ap.add_argument("--checkpoint", default=None, help="decoder (default: the store's training, else the shipped one)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--background", default="random", choices=("random", "white"))
    ap.add_argument("--targets", type=float, nargs="*", default=[21.0, 22.0, 23.0, 24.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "refine.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = RunStore(args.store, create=False)
    model, source = load_decoder(store, args.checkpoint)
    print(f"decoder: {source}")
    scenes = [run_scene(store, s, model, source, args) for s in args.scenes.split(",")]
    summarize(scenes, args.targets)
    Path(args.out).write_text(json.dumps({"args": vars(args), "decoder": source, "scenes": scenes}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
