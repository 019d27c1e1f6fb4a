"""Benchmark: the time-conditioned (dynamic) decoder against baselines on held-out dynamic scenes (issue 16).

For each held-out scene of a dynamic decoder run (seeds never trained on) and each query frame, scores (see
``lyra_pipeline.dynamic_quality``) at cameras no model saw: ``held_out`` (random poses around the input camera at
that time) and ``flip`` (the flipped paths' cameras at that time, whose teacher frames are never decoder inputs),
against exact renders of the moving scene at that time:

- flat (the input frame's mean colour), rgbd (the input frame at that time unprojected with its depth),
- static: the static decoder (default: the package's shipped one) applied at that frame, same inputs: Gaussians of
  the query frame only, and (``static_query+keyframes``) in the dynamic decoder's layout, with the other keyframes,
- dynamic: the trained time-conditioned decoder (``--checkpoint`` or the run's last checkpoint),
- ceiling: the dynamic decoder's output layout with exact data (its rays at exact depth, the frames' colours),
- optimized_<N>: per-frame per-scene optimisation on the frames that exist at that time.

Writes ``--out`` (JSON: table, per-(scene, frame, split, method) rows, settings, model hashes).

    python benchmarks/bench_dynamic.py --store dyn24 --run decoder-edb6adde84af --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_ops.decoder import with_time_frames  # noqa: E402
from lyra_pipeline.dynamic_quality import DynamicQualitySettings, scene_rows, store_moving, summarize  # noqa: E402
from lyra_pipeline.shipped import MODEL_FILE, shipped_decoder_dir  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import ViewCache, final_checkpoint, load_decoder_bytes, load_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--run", required=True, help="the dynamic decoder's training run (its val scenes are scored)")
    ap.add_argument("--checkpoint", default=None, help="dynamic decoder .safetensors (default: the run's last)")
    ap.add_argument("--static", default=None, help="static decoder .safetensors (default: the shipped decoder)")
    ap.add_argument("--frames", default="3,12,21", help="query frames (input frame indices)")
    ap.add_argument("--views", type=int, default=6, help="held-out cameras per scene and frame")
    ap.add_argument("--optimize-steps", default="300", help="per-frame optimisation snapshots ('' for none)")
    ap.add_argument("--scenes", default=None, help="comma-separated scene ids (default: the run's val scenes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dynamic_quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    store = RunStore(args.store, create=False)
    run = load_run(store, args.run)
    if args.checkpoint:
        dyn_path, dyn_bytes = args.checkpoint, Path(args.checkpoint).read_bytes()
    else:
        step = final_checkpoint(store, run)
        dyn_path = RunStore.checkpoint_rel(run.name, step, "model.safetensors")
        dyn_bytes = store.read_file(dyn_path)
    static_path = Path(args.static) if args.static else shipped_decoder_dir() / MODEL_FILE
    static_bytes = static_path.read_bytes()
    static = load_decoder_bytes(static_bytes, str(static_path)).eval()
    dynamic = load_decoder_bytes(dyn_bytes, dyn_path).eval()
    models = {"static": with_time_frames(static, "query")}
    if dynamic.config.time_frames != "query":  # the static decoder in the dynamic decoder's layout too
        models[f"static_{dynamic.config.time_frames}"] = with_time_frames(static, dynamic.config.time_frames)
    models["dynamic"] = dynamic
    steps = tuple(int(s) for s in args.optimize_steps.split(",") if s.strip())
    settings = DynamicQualitySettings(frames=tuple(int(f) for f in args.frames.split(",")),
                                      held_out_views=args.views, optimize_steps=steps, moving=store_moving(store),
                                      ceiling=dynamic.config)
    scenes = args.scenes.split(",") if args.scenes else run.val_scenes
    assert not set(scenes) & set(run.train_scenes), "scored scenes must be held out"
    views = ViewCache(store, size=16)
    rows, seconds = [], {}
    for sid in scenes:
        t0 = time.perf_counter()
        rows += scene_rows(store, sid, models, settings, views)
        seconds[sid] = time.perf_counter() - t0
        print(f"{sid}: {seconds[sid]:.0f} s", flush=True)
    table = summarize(rows)
    doc = {
        "store": args.store, "run": run.name, "train_scenes": len(run.train_scenes), "scenes": scenes,
        "dynamic_checkpoint": str(dyn_path), "dynamic_sha256": hashlib.sha256(dyn_bytes).hexdigest(),
        "static_checkpoint": str(static_path), "static_sha256": hashlib.sha256(static_bytes).hexdigest(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v.to_dict() if hasattr(v, "to_dict") else v)
                     for k, v in vars(settings).items()},
        "threads": args.threads, "seconds_per_scene": seconds, "table": table, "rows": rows,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"{'split':9s} {'method':14s} {'psnr':>7s} {'moving':>7s} {'absrel':>7s}")
    for r in table:
        print(f"{r['split']:9s} {r['method']:14s} {r['psnr']:7.2f} {r.get('moving_psnr', float('nan')):7.2f} "
              f"{r.get('depth_absrel', float('nan')):7.3f}")


if __name__ == "__main__":
    main()
