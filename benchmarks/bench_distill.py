"""Benchmark: decoder self-distillation on a procedural store, novel-view PSNR on held-out scenes.

Trains the decoder with a training preset (in-process, chunk by chunk, exactly what the ``distill-decoder``
flow's tasks do), then evaluates the final checkpoint on the held-out scenes: the decoder gets all six
trajectories of a scene (Lyra's inference) and renders every frame, compared with the teacher frames and the
exact ground truth. Frames are split into even and odd indices so the numbers can be set beside the per-scene
optimisation baseline (``bench_optimize.py``), which trains on the even frames and is scored on the odd ones.
Prints a summary and writes JSON; never asserts.

    python benchmarks/bench_distill.py --store /tmp/default32 --num-scenes 32 --val-scenes 3
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_pipeline.config import build_config  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import (  # noqa: E402,E501
    build_train_config,
    chunk_ends,
    load_decoder_bytes,
    plan_run,
    read_metrics,
    train_until,
)
from tasks.train import decoder_frame_rows  # noqa: E402


def ensure_store(path: str, preset: str, num_scenes: int) -> None:
    """Generate the dataset in-process (no Prefect) when the store lacks scenes."""
    from tasks.sdg import SCENE_TASKS, sample_prompts

    config = build_config(preset, {"scenes": {"num_scenes": num_scenes}})
    t0 = time.perf_counter()
    for scene in sample_prompts.fn(path, config):
        for task in SCENE_TASKS.values():
            task.fn(path, config, scene, "bench")
    print(f"dataset: {num_scenes} scenes ({preset}) ready in {time.perf_counter() - t0:.0f} s")


def mean(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--data-preset", default="default")
    ap.add_argument("--num-scenes", type=int, default=32)
    ap.add_argument("--preset", default="default", help="training preset")
    ap.add_argument("--val-scenes", type=int, default=3)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/distill_default.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    ensure_store(args.store, args.data_preset, args.num_scenes)
    base = build_train_config(args.preset)
    stages = [{**s.model_dump(), "steps": max(1, round(s.steps * args.steps_scale))} for s in base.stages]
    over = {"val_scenes": args.val_scenes, "stages": stages, "eval_frame_stride": 1}
    if args.threads:
        over["torch_threads"] = args.threads
    config = build_train_config(args.preset, over)
    store = RunStore(args.store)
    run = plan_run(store, config)
    print(f"run {run.name}: train {len(run.train_scenes)} scenes, held out {run.val_scenes}")
    t0 = time.perf_counter()
    for end in chunk_ends(config):
        train_until(args.store, run.name, end)
    train_s = time.perf_counter() - t0
    metrics = read_metrics(store, run.name).to_pylist()
    step = config.total_steps
    rel = RunStore.checkpoint_rel(run.name, step, "model.safetensors")
    model = load_decoder_bytes(store.read_file(rel), rel)
    t1 = time.perf_counter()
    with torch.no_grad():
        rows = decoder_frame_rows(store, run, step, model, "bench")
    eval_s = time.perf_counter() - t1
    seeds = {r["scene_id"]: r["seed"] for r in store.read_prompts()}

    def summary(sel: list[dict]) -> dict[str, float]:
        return {"psnr_gt": mean([r["psnr_gt"] for r in sel]), "ssim_gt": mean([r["ssim_gt"] for r in sel]),
                "psnr_teacher": mean([r["psnr_teacher"] for r in sel]), "frames": len(sel)}

    by_stage: dict[str, list[float]] = {}
    for m in metrics:
        by_stage.setdefault(m["stage"], []).append(m["seconds"])
    result = {
        "run": run.name, "preset": args.preset, "steps": step, "train_scenes": len(run.train_scenes),
        "val_scenes": run.val_scenes, "val_seeds": [seeds[s] for s in run.val_scenes],
        "train_seconds": train_s, "eval_seconds": eval_s,
        "seconds_per_step": {k: statistics.fmean(v) for k, v in by_stage.items()},
        "loss_first_50": mean([m["total"] for m in metrics[:50]]),
        "loss_last_50": mean([m["total"] for m in metrics[-50:]]),
        "all_frames": summary(rows), "odd_frames": summary([r for r in rows if r["frame"] % 2 == 1]),
        "per_trajectory": {t: summary([r for r in rows if r["trajectory"] == t])
                           for t in sorted({r["trajectory"] for r in rows})},
        "gaussians": rows[0]["gaussians"] if rows else 0,
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
