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

``--timing``: what a user waits for instead: one scene, one initialisation, the ``--steps`` steps exactly as
``refine_until`` runs them (``lyra_pipeline.refine._compute_threads``: the C kernel on ``--threads``, torch's
small ops on one), seconds per step (wall and process CPU) every ``--eval-every`` steps, a per-part breakdown
of 10 steps at the start and 10 after densification (process CPU ms: projection, binning, compositing forward /
backward, Adam, the rest), then the held-out scoring of ``finish_refine`` (before + after, the scored subset)
against all held-out frames (time and PSNR difference). Machine load (``os.getloadavg``) before and after.
Merged into ``--out`` under ``"timing"`` (the quality results stay).

    python benchmarks/bench_refine.py --store S --scenes proc-000000 --timing --threads 2 --init decoder
"""

from __future__ import annotations

import argparse
import json
import os
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
from lyra_pipeline.refine import (  # noqa: E402
    GREY,
    WHITE,
    RefineConfig,
    _compute_threads,
    held_out_psnr,
    initial_gaussians,
    scene_targets,
    scored_held_out,
)
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


def profile_steps(opt: SceneOptimizer, steps: int, threads: int) -> dict[str, float]:
    """Process CPU milliseconds per step of each part over ``steps`` steps (CPU time, not wall: it holds up on a
    busy machine; at one thread it is what the step takes on a quiet one): the kernels' projection, binning and
    compositing, Adam, and the rest (activations, loss, the final images, autograd, densification)."""
    from lyra_ops import raster_kernel as rk

    spent: dict[str, float] = {}

    def timed(name, fn):
        def run(*a, **k):
            c0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - c0

        return run

    patches = [(rk.CpuCompositor, "forward", "composite forward", True),
               (rk.CpuCompositor, "backward", "composite backward", True),
               (rk.CpuProjection, "forward", "project forward", True),
               (rk.CpuProjection, "backward", "project backward", True),
               (rk, "bin_tiles", "bin tiles", False),
               (torch.optim.Adam, "step", "adam", False)]
    saved = [(obj, attr, obj.__dict__[attr]) for obj, attr, _, _ in patches]
    for obj, attr, name, static in patches:
        fn = timed(name, getattr(obj, attr))
        setattr(obj, attr, staticmethod(fn) if static else fn)
    try:
        with _compute_threads(threads):
            t0, c0 = time.perf_counter(), time.process_time()
            opt.run(opt.step + steps)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        for obj, attr, original in saved:
            setattr(obj, attr, original)
    parts = {name: round(1e3 * spent.get(name, 0.0) / steps, 2) for _, _, name, _ in patches}
    parts["rest"] = round(1e3 * cpu / steps - sum(parts.values()), 2)
    parts["cpu ms/step"] = round(1e3 * cpu / steps, 2)
    parts["wall ms/step"] = round(1e3 * wall / steps, 2)
    parts["gaussians"] = opt.params.num
    return parts


def run_timing(store: RunStore, scene_id: str, model, args: argparse.Namespace) -> dict:
    trajectories = scene_trajectories(store, scene_id)
    views = ViewCache(store, size=len(trajectories))
    config = RefineConfig(steps=args.steps, background=args.background, init=args.init, torch_threads=args.threads)
    targets = scene_targets(views, scene_id, trajectories, config.frame_stride)
    init = initial_gaussians(views, scene_id, trajectories, config, model)
    make = lambda: SceneOptimizer(targets.fit_frames, targets.fit_cameras, init,  # noqa: E731
                                  config.optimize_config(), depths=targets.fit_depths)
    load_before = os.getloadavg()
    breakdown = {}
    probe = make()
    breakdown["steps 0-9"] = profile_steps(probe, 10, args.threads)
    with _compute_threads(args.threads):
        probe.run(config.optimize_config().densify_from + 60)  # past two densifications
    breakdown[f"steps {probe.step}-{probe.step + 9}"] = profile_steps(probe, 10, args.threads)
    print("per-step breakdown (process CPU ms):", json.dumps(breakdown, indent=1), flush=True)
    opt = make()
    rows, wall, cpu = [], 0.0, 0.0
    for end in range(args.eval_every, args.steps + 1, args.eval_every):
        t0, c0 = time.perf_counter(), time.process_time()
        with _compute_threads(args.threads):
            opt.run(end)
        dw, dc = time.perf_counter() - t0, time.process_time() - c0
        wall, cpu = wall + dw, cpu + dc
        rows.append({"step": end, "gaussians": opt.params.num, "wall_s_per_step": dw / args.eval_every,
                     "cpu_s_per_step": dc / args.eval_every, "load1": os.getloadavg()[0]})
        print(f"  step {end}: {dw / args.eval_every:.3f} s/step wall, {dc / args.eval_every:.3f} CPU s/step, "
              f"{opt.params.num} Gaussians, load {os.getloadavg()[0]:.1f}", flush=True)
    backgrounds = {"white": WHITE, "grey": GREY}
    scored = scored_held_out(targets)
    timing = {}
    for label, tg in (("scored", scored), ("all", targets)):
        t0, c0 = time.perf_counter(), time.process_time()
        with _compute_threads(args.threads):
            before, after = held_out_psnr(init, tg, backgrounds), held_out_psnr(opt.gaussians(), tg, backgrounds)
        timing[label] = {"frames": len(tg.held), "wall_s": time.perf_counter() - t0,
                         "cpu_s": time.process_time() - c0, "psnr_before": before, "psnr_after": after}
    share = timing["scored"]["wall_s"] / wall
    print(f"refinement {args.steps} steps: {wall:.1f} s wall, {cpu:.1f} CPU s; held-out scoring "
          f"{timing['scored']['frames']} frames {timing['scored']['wall_s']:.2f} s ({100 * share:.1f}% of it; all "
          f"{timing['all']['frames']}: {timing['all']['wall_s']:.2f} s); PSNR after, scored vs all: "
          f"{timing['scored']['psnr_after']} vs {timing['all']['psnr_after']}", flush=True)
    return {"scene": scene_id, "init": args.init, "init_gaussians": init.num, "threads": args.threads,
            "torch_num_threads_during_steps": 1, "size": [targets.fit_frames.shape[2], targets.fit_frames.shape[3]],
            "steps": args.steps, "refine_wall_s": wall, "refine_cpu_s": cpu, "curve": rows,
            "breakdown_ms_per_step": breakdown, "held_out_scoring": timing, "scoring_share_of_refine": share,
            "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count()}


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
    ap.add_argument("--timing", action="store_true", help="time one refinement (see the module docstring)")
    ap.add_argument("--init", default="decoder", choices=("decoder", "rgbd"), help="--timing: the initialisation")
    ap.add_argument("--label", default="", help="--timing: key of this run under \"timing\" in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = RunStore(args.store, create=False)
    model, source = load_decoder(store, args.checkpoint)
    print(f"decoder: {source}")
    if args.timing:
        out = Path(args.out)
        scene = args.scenes.split(",")[0]
        label = args.label or f"{scene}-{args.init}-{args.threads}threads"
        row = {"args": vars(args), "decoder": source, **run_timing(store, scene, model, args)}
        doc = json.loads(out.read_text()) if out.exists() else {}  # read after the run: others may have written
        doc.setdefault("timing", {})[label] = row
        out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {out} (timing/{label})")
        return
    scenes = [run_scene(store, s, model, source, args) for s in args.scenes.split(",")]
    summarize(scenes, args.targets)
    Path(args.out).write_text(json.dumps({"args": vars(args), "decoder": source, "scenes": scenes}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
