"""Benchmark: the decoder-quality table, the distilled decoder beside baselines that need no learning.

On held-out procedural scenes (seeds never trained on) each method is scored on three splits
(``lyra_pipeline.quality``): ``path``, every ``--path-stride``-th frame of the scene's six trajectories (vs the
exact render and vs the teacher frame), ``held_out``, ``--held-out`` seeded random cameras near the
trajectories that no model saw, and ``input``, the input camera itself; on every split all pixels, the pixels the
input frame saw (its exact depth within 2%: ``psnr_seen``) and the rest (``psnr_unseen``). Per scene, the
decoder's margin over RGB-D on seen pixels and at the input camera (``seen_margin``, ``input_margin``).
Methods: ``flat`` (the input frame's mean colour), ``rgbd`` (the input frame unprojected with its exact depth),
``ceiling`` (exact depth + teacher colours on the decoder's own Gaussian grid), ``optimized_300`` /
``optimized_1000`` (per-scene 3DGS optimisation on the teacher frames; ``--optimize``, ~10 min per 176x320 scene
on a CPU), ``decoder``.
Writes ``benchmarks/results/decoder_quality.json`` (per split: ``<method>_<metric>`` means over scenes with
``_std`` / ``_min`` / ``_max``, ``plane_depth_absrel``, ``scenes``, ``frames``; per trajectory for path frames)
and prints a table; never asserts.

Evaluate an existing checkpoint (no training):

    python benchmarks/bench_distill.py --store /work/data/d40 --run decoder-0123456789ab         # its held-out scenes
    python benchmarks/bench_distill.py --store /work/data/d40 --checkpoint model.safetensors \\
        --scenes proc-000003,proc-000017 --optimize

Train with a preset first (in-process, chunk by chunk, exactly what the ``distill-decoder`` flow's tasks do),
then evaluate the final checkpoint on the run's held-out scenes:

    python benchmarks/bench_distill.py --train --store /tmp/default32 --num-scenes 32 --val-scenes 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lyra_ops.decoder import with_render  # noqa: E402
from lyra_ops.losses import make_lpips  # noqa: E402
from lyra_pipeline.config import build_config  # noqa: E402
from lyra_pipeline.quality import (  # noqa: E402
    CHEAP_METHODS,
    METHODS,
    OPTIMIZED_METHODS,
    QualitySettings,
    available_methods,
    margins,
    per_scene,
    quality_table,
    scene_quality_rows,
    summarize_quality,
)
from lyra_pipeline.shipped import shipped_decoder_info  # noqa: E402
from lyra_pipeline.storage import RunStore  # noqa: E402
from lyra_pipeline.training import (  # noqa: E402
    LATEST,
    TrainRun,
    ViewCache,
    build_train_config,
    checkpoint_steps,
    chunk_ends,
    index_dataset,
    load_decoder_bytes,
    load_run,
    plan_run,
    read_metrics,
    train_until,
)

DEFAULT_OUT = "benchmarks/results/decoder_quality.json"


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


def train(args: argparse.Namespace) -> tuple[TrainRun, str, dict[str, Any]]:
    """Train a run with ``--preset`` on ``--store`` (generated first when empty); its final checkpoint's path."""
    ensure_store(args.store, args.data_preset, args.num_scenes)
    base = build_train_config(args.preset)
    stages = [{**s.model_dump(), "steps": max(1, round(s.steps * args.steps_scale))} for s in base.stages]
    over: dict[str, Any] = {"val_scenes": args.val_scenes, "stages": stages, "eval_frame_stride": 1}
    if args.threads:
        over["torch_threads"] = args.threads
    config = build_train_config(args.preset, over)
    store = RunStore(args.store)
    run = plan_run(store, config)
    print(f"run {run.name}: train {len(run.train_scenes)} scenes, held out {run.val_scenes}")
    t0 = time.perf_counter()
    for end in chunk_ends(config):
        train_until(args.store, run.name, end)
    metrics = read_metrics(store, run.name).to_pylist()
    by_stage: dict[str, list[float]] = {}
    for m in metrics:
        by_stage.setdefault(m["stage"], []).append(m["seconds"])
    info = {
        "preset": args.preset, "steps": config.total_steps, "train_scenes": len(run.train_scenes),
        "train_seconds": time.perf_counter() - t0,
        "seconds_per_step": {k: statistics.fmean(v) for k, v in by_stage.items()},
        "loss_first_50": mean([m["total"] for m in metrics[:50]]),
        "loss_last_50": mean([m["total"] for m in metrics[-50:]]),
    }  # fmt: skip
    return run, RunStore.checkpoint_rel(run.name, config.total_steps, "model.safetensors"), info


def run_from_checkpoint_path(store: RunStore, checkpoint: str) -> TrainRun | None:
    """The run a ``train/<run>/checkpoints/step-N/model.safetensors`` path belongs to, when this store has it."""
    parts = Path(checkpoint).parts
    if "checkpoints" in parts and parts.index("checkpoints") >= 1:
        name = parts[parts.index("checkpoints") - 1]
        if store.read_file(RunStore.train_rel(name, "run.json")) is not None:
            return load_run(store, name)
    return None


def resolve(args: argparse.Namespace, store: RunStore) -> tuple[bytes, str, list[str], TrainRun | None]:
    """(checkpoint bytes, where they came from, scenes to score, the training run if known)."""
    run = load_run(store, args.run) if args.run else None
    if args.checkpoint:
        source = args.checkpoint
        data = Path(args.checkpoint).read_bytes() if Path(args.checkpoint).is_file() else store.read_file(source)
        if data is None:
            raise SystemExit(f"{args.checkpoint}: no such file (locally or in the store)")
        run = run or run_from_checkpoint_path(store, args.checkpoint)
    elif run is not None:
        steps = checkpoint_steps(store, run.name)
        if not steps:
            raise SystemExit(f"run {run.name} has no committed checkpoint yet")
        if steps[-1] < run.config.total_steps:
            print(f"note: run {run.name} is unfinished: evaluating its newest checkpoint, step {steps[-1]} of "
                  f"{run.config.total_steps}")
        source = RunStore.checkpoint_rel(run.name, steps[-1], "model.safetensors")
        data = store.read_file(source)
    else:
        latest = store.read_file(LATEST)
        if latest is None:
            raise SystemExit("pass --checkpoint and --scenes, or --run (no train/latest.json in the store)")
        doc = json.loads(latest)
        run, source = load_run(store, doc["run"]), doc["checkpoint"]
        data = store.read_file(source)
    if args.scenes:
        scenes = [s.strip() for s in args.scenes.split(",") if s.strip()]
    elif run is not None:
        scenes = list(run.val_scenes)
    else:
        raise SystemExit("pass --scenes id,id (or --run NAME for a run's held-out scenes)")
    if run is not None and set(scenes) & set(run.train_scenes):
        print(f"WARNING: {sorted(set(scenes) & set(run.train_scenes))} were training scenes of run {run.name}: "
              "these numbers are not held-out")
    return data, source, scenes, run


def fmt(block: dict[str, Any], key: str, spec: str = ".2f") -> str:
    value = block.get(key, math.nan)
    if not isinstance(value, float) or not math.isfinite(value):
        return "–"
    std = block.get(f"{key}_std", math.nan)
    return format(value, spec) + (f" ±{format(std, spec)}" if isinstance(std, float) and math.isfinite(std) else "")


def print_table(summary: dict[str, Any], methods: list[str]) -> None:
    """Readable table: per split one line per method (means over scenes ± std over scenes)."""
    for split in ("path", "held_out", "input"):
        block = summary.get(split)
        if block is None:
            continue
        print(f"\n{split}: {block['scenes']} scene(s), {block['frames']} views per method; PSNR in dB; depth = AbsRel "
              f"where alpha > 0.5; plane depth AbsRel {fmt(block, 'plane_depth_absrel', '.3f')}")
        cols = [("PSNR", "psnr", ".2f"), ("SSIM", "ssim", ".3f"), ("LPIPS", "lpips", ".3f"),
                ("depth", "depth_absrel", ".3f")]
        cols += [("PSNR seen px", "psnr_seen", ".2f")]
        cols += [("PSNR unseen px", "psnr_unseen", ".2f")] if split != "input" else []
        cols += [("PSNR vs teacher", "psnr_teacher", ".2f")] if split == "path" else []
        print(f"  {'method':<15}" + "".join(f"{c[0]:>17}" for c in cols) + f"{'build s':>10}{'render s':>10}")
        for m in methods:
            if f"{m}_psnr" not in block:
                continue
            cells = "".join(f"{fmt(block, f'{m}_{key}', spec):>17}" for _, key, spec in cols)
            print(f"  {m:<15}{cells}{block[f'{m}_build_seconds']:>10.1f}{block[f'{m}_render_seconds']:>10.1f}")
    per = summary.get("path_per_trajectory", {})
    if per:
        print("\npath PSNR per trajectory (dB): " + "  ".join(f"{m}" for m in methods))
        for traj, block in per.items():
            print(f"  {traj:<10} " + "  ".join(f"{fmt(block, f'{m}_psnr'):>12}" for m in methods))


def print_margins(result: dict[str, Any]) -> None:
    """Per split, the decoder minus RGB-D in every scene: on seen pixels, and (input split) the whole view."""
    for key, title in (("seen_margin", "PSNR on seen pixels"), ("input_margin", "PSNR at the input camera")):
        block = result.get(key) or {}
        for split, diffs in block.items():
            cells = "  ".join(f"{s}: {v:+.2f}" for s, v in diffs.items() if s != "min")
            print(f"decoder - rgbd, {title}, {split}: min {diffs['min']:+.2f} dB ({cells})")


def json_safe(value: Any) -> Any:
    """NaN / inf -> None, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--checkpoint", help="model.safetensors to evaluate (a file, or a path relative to the store)")
    ap.add_argument("--run", help="training run: its held-out scenes (without --checkpoint: its newest checkpoint)")
    ap.add_argument("--scenes", help="comma-separated scene ids to score (default: the run's held-out scenes)")
    ap.add_argument("--methods", default=",".join(CHEAP_METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--optimize", action="store_true", help=f"add {', '.join(OPTIMIZED_METHODS)} (slow)")
    ap.add_argument("--path-stride", type=int, default=4, help="score every k-th frame of each trajectory")
    ap.add_argument("--held-out", type=int, default=8, help="held-out cameras per scene")
    ap.add_argument("--optimize-frame-stride", type=int, default=2)
    ap.add_argument("--optimize-init-points", type=int, default=20_000)
    ap.add_argument("--render", action="append", default=[], metavar="FIELD=VALUE",
                    help="decode with a rendering-only decoder setting (lyra_ops.decoder.RENDER_FIELDS), e.g. "
                         "input_guard=0.5; the shipped decoder's own (decoder.json 'render') apply with --shipped")
    ap.add_argument("--shipped", action="store_true", help="evaluate the shipped package decoder as users get it")
    ap.add_argument("--lpips-weights", default=None)
    ap.add_argument("--lpips-backbone", default=None)
    ap.add_argument("--device", default="cpu", help="decoder device (renders follow the Gaussians)")
    ap.add_argument("--backend", default="torch", help="rasterizer backend: torch (CPU/CUDA) or gsplat (CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--extra-rows", action="append", help="Parquet rows (--rows of an earlier run on the same "
                    "settings) whose methods are added to the table, e.g. the slow optimisation baselines")
    ap.add_argument("--rows", default=None, help="also write every per-view row to this Parquet file")
    train_args = ap.add_argument_group("train first (--train): the previous mode of this benchmark")
    train_args.add_argument("--train", action="store_true", help="train a run with --preset, then evaluate it")
    train_args.add_argument("--data-preset", default="default")
    train_args.add_argument("--num-scenes", type=int, default=32)
    train_args.add_argument("--preset", default="default", help="training preset")
    train_args.add_argument("--val-scenes", type=int, default=3)
    train_args.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    training: dict[str, Any] | None = None
    if args.train:
        run, rel, training = train(args)
        args.run, args.checkpoint = run.name, rel
    store = RunStore(args.store, create=False)
    if args.shipped:
        from lyra_pipeline.shipped import MODEL_FILE, shipped_decoder_dir

        args.checkpoint = str(shipped_decoder_dir() / MODEL_FILE)
    data, source, scenes, run = resolve(args, store)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = available_methods(methods + (list(OPTIMIZED_METHODS) if args.optimize else []))
    settings = QualitySettings(path_stride=args.path_stride, held_out_views=args.held_out,
                               optimize_frame_stride=args.optimize_frame_stride,
                               optimize_init_points=args.optimize_init_points, backend=args.backend)
    model = load_decoder_bytes(data, source)
    render = dict(shipped_decoder_info().get("render") or {}) if args.shipped else {}
    for item in args.render:
        key, _, value = item.partition("=")
        render[key.strip()] = yaml.safe_load(value)
    if render:
        model = with_render(model, **render)
    model = model.to(args.device)
    sha = hashlib.sha256(data).hexdigest()
    lpips = make_lpips(args.lpips_weights, backbone_path=args.lpips_backbone) if args.lpips_weights else None
    index = index_dataset(store).scenes
    missing = [s for s in scenes if s not in index]
    if missing:
        raise SystemExit(f"scenes {missing} have no finished latents in {store.url}")
    seeds = {r["scene_id"]: r["seed"] for r in store.read_prompts()}
    print(f"bench_distill: {source} (sha256 {sha[:12]}) on {len(scenes)} scene(s) {scenes}; methods {methods}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows: list[dict[str, Any]] = []
    views = ViewCache(store, size=8)
    t0 = time.perf_counter()
    scene_seconds = {}
    for sid in scenes:
        t1 = time.perf_counter()
        rows += scene_quality_rows(store, sid, model, methods=methods, settings=settings, views=views, lpips=lpips,
                                   index=index, sha=sha)
        scene_seconds[sid] = time.perf_counter() - t1
        print(f"  {sid}: {scene_seconds[sid]:.0f} s")
    extra_scenes: dict[str, list[str]] = {}
    import pyarrow.parquet as pq

    for path in args.extra_rows or []:  # rows of other methods measured earlier (e.g. the slow optimisation)
        for row in pq.read_table(path).to_pylist():
            if row["method"] not in methods:
                rows.append(row)
                seen = set(extra_scenes.get(row["method"], [])) | {row["scene_id"]}
                extra_scenes[row["method"]] = sorted(seen)
        methods = methods + [m for m in extra_scenes if m not in methods]
    summary = summarize_quality(rows)
    result = {
        "checkpoint": source, "model_sha256": sha, "store": store.url, "run": run.name if run else None,
        "decoder": model.config.to_dict(), "render": render, "scenes_evaluated": scenes,
        "scene_seeds": {s: seeds.get(s) for s in scenes}, "methods": methods, "settings": settings.as_dict(),
        "lpips": lpips is not None, "threads": torch.get_num_threads(), "eval_seconds": time.perf_counter() - t0,
        "seconds_per_scene": scene_seconds, "extra_rows": {m: {"scenes": sc} for m, sc in extra_scenes.items()},
        **summary, "table": quality_table(rows), "per_scene": per_scene(rows),
    }  # fmt: skip
    if {"decoder", "rgbd"} <= set(methods):  # issue 27: seen pixels at least as good as the input's own, per scene
        result["seen_margin"] = margins(rows, "decoder", "rgbd", "psnr_seen")
        result["input_margin"] = {k: v for k, v in margins(rows, "decoder", "rgbd", "psnr").items() if k == "input"}
    if training is not None:
        result["training"] = training
    print_table(summary, methods)
    print_margins(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(json_safe(result), indent=2))
    print(f"\nwrote {args.out}")
    if args.rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from lyra_pipeline.quality import QUALITY_SCHEMA

        pq.write_table(pa.Table.from_pylist(rows, schema=QUALITY_SCHEMA), args.rows)


if __name__ == "__main__":
    main()
