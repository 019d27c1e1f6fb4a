"""Prefect tasks of decoder self-distillation: plan a run, train one chunk of steps, evaluate a checkpoint.

Tasks are coarse (a chunk is ``checkpoint_every`` steps) and return small dicts; the training state travels
through the store's checkpoints, never through Prefect results.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pyarrow as pa
import torch
from prefect import task
from torchmetrics.functional.image import structural_similarity_index_measure

from lyra_ops.distill import background_color
from lyra_ops.errors import LyraInputError
from lyra_ops.images import from_uint8, to_uint8
from lyra_ops.losses import make_lpips
from lyra_ops.metrics import psnr
from lyra_pipeline.quality import CHEAP_METHODS, QUALITY_SCHEMA, available_methods, scene_quality_rows
from lyra_pipeline.retries import STAGE_TASK_OPTIONS
from lyra_pipeline.storage import RunStore
from lyra_pipeline.threads import pin_torch_threads
from lyra_pipeline.training import (
    TrainConfig,
    TrainRun,
    ViewCache,
    forward_paths,
    index_dataset,
    is_dynamic_scene,
    load_decoder_bytes,
    load_run,
    plan_run,
    procedural_world,
    render_view,
    scene_gaussians,
    scene_gaussians_at,
    train_until,
)

EVAL_SCHEMA = pa.schema([
    ("run", pa.string()), ("step", pa.int64()), ("model_sha256", pa.string()), ("scene_id", pa.string()),
    ("trajectory", pa.string()), ("frame", pa.int32()), ("input_views", pa.int32()), ("gaussians", pa.int64()),
    ("psnr_teacher", pa.float64()), ("ssim_teacher", pa.float64()),
    ("psnr_gt", pa.float64()), ("ssim_gt", pa.float64()),
    ("lpips_teacher", pa.float64()), ("lpips_gt", pa.float64()),
])  # fmt: skip


@task(name="plan-training", **STAGE_TASK_OPTIONS)
def plan_training(store_url: str, config: TrainConfig) -> dict[str, Any]:
    """Create (or find) the run for this config and the store's current dataset; record its split."""
    store = RunStore(store_url, create=False)
    store.check_writable()  # a read-only store fails here, before any training
    run = plan_run(store, config)
    return {"run": run.name, "train_scenes": run.train_scenes, "val_scenes": run.val_scenes,
            "total_steps": config.total_steps}


@task(name="train-chunk", **STAGE_TASK_OPTIONS)
def train_chunk(store_url: str, run_name: str, until_step: int) -> dict[str, Any]:
    """Train from the newest checkpoint up to ``until_step`` steps (no-op when already there)."""
    return train_until(store_url, run_name, until_step)


def scene_decoder_rows(store: RunStore, scene_id: str, model, *, sha: str, run: str, step: int, stride: int = 1,
                       backend: str = "torch", views: ViewCache | None = None, lpips=None,
                       index: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """Per frame (every ``stride``-th) of every trajectory of one scene: the decoder (all trajectories as input)
    rendered there, PSNR/SSIM (and LPIPS when a local LPIPS module is given) vs the teacher frame and, for
    procedural scenes, vs the exact ground truth."""

    def lp(a: torch.Tensor, b: torch.Tensor) -> list[float]:
        if lpips is None:
            return [math.nan] * a.shape[0]
        with torch.no_grad():
            return [float(v) for v in lpips(a, b).flatten()]

    trajs = (index if index is not None else index_dataset(store).scenes).get(scene_id, [])
    if not trajs:
        return []
    views = views or ViewCache(store, size=len(trajs))
    frames = int(views.get(scene_id, trajs[0]).frames.shape[0])
    if is_dynamic_scene(store, scene_id):  # dynamic: Gaussians per time step
        return dynamic_decoder_rows(store, scene_id, model, trajs, frames, sha=sha, run=run, step=step,
                                    stride=stride, backend=backend, views=views, lp=lp)
    world = procedural_world(store, scene_id)
    gaussians = scene_gaussians(model, views, scene_id, trajs)
    rows: list[dict[str, Any]] = []
    for traj in trajs:
        targets = list(range(0, frames, stride))
        render, teacher = render_view(gaussians, views.get(scene_id, traj), targets, backend,
                                      background=model.config.background)
        p_t = psnr(render, teacher)
        s_t = structural_similarity_index_measure(render, teacher, data_range=1.0, reduction="none")
        l_t, l_g = lp(render, teacher), [math.nan] * len(targets)
        if world is not None:
            cams = views.get(scene_id, traj).cameras
            gt = from_uint8(to_uint8(world.render(cams.c2w[targets], cams.K[targets], cams.height, cams.width).rgb))
            p_g = psnr(render, gt)
            s_g = structural_similarity_index_measure(render, gt, data_range=1.0, reduction="none")
            l_g = lp(render, gt)
        for i, f in enumerate(targets):
            rows.append({
                "run": run, "step": step, "model_sha256": sha, "scene_id": scene_id, "trajectory": traj,
                "frame": f, "input_views": len(trajs), "gaussians": gaussians.num,
                "psnr_teacher": float(p_t[i]), "ssim_teacher": float(s_t[i]),
                "psnr_gt": float(p_g[i]) if world is not None else math.nan,
                "ssim_gt": float(s_g[i]) if world is not None else math.nan,
                "lpips_teacher": l_t[i], "lpips_gt": l_g[i],
            })  # fmt: skip
    return rows


def dynamic_decoder_rows(store: RunStore, scene_id: str, model, trajs: list[str], frames: int, *, sha: str, run: str,
                         step: int, stride: int, backend: str, views: ViewCache, lp) -> list[dict[str, Any]]:
    """:func:`scene_decoder_rows` of a dynamic scene: at every ``stride``-th input frame, the decoder's Gaussians of
    that time (the input video and the forward paths as input) rendered at every path's frame there (flipped
    twins included), against the teacher frame and, for procedural scenes, the exact render at that time."""
    from lyra_pipeline.dynamic_quality import dynamic_world

    forward = forward_paths(trajs)
    try:
        world = dynamic_world(store, scene_id)
    except LyraInputError:
        world = None  # a user video: no exact truth
    input_view, times = views.input_view(scene_id)
    rows: list[dict[str, Any]] = []
    for f in range(0, frames, stride):
        gaussians = scene_gaussians_at(model, views, scene_id, forward, f)
        behind = background_color(input_view.frames[f], model.config.background)
        for traj in trajs:
            render, teacher = render_view(gaussians, views.get(scene_id, traj), [f], backend, behind=behind)
            p_t, l_t = float(psnr(render, teacher)[0]), lp(render, teacher)[0]
            s_t = float(structural_similarity_index_measure(render, teacher, data_range=1.0, reduction="none")[0])
            p_g = s_g = l_g = math.nan
            if world is not None:
                cams = views.get(scene_id, traj).cameras
                gt = from_uint8(to_uint8(world.render(cams.c2w[[f]], cams.K[[f]], cams.height, cams.width,
                                                      [float(times[f])]).rgb))
                p_g, l_g = float(psnr(render, gt)[0]), lp(render, gt)[0]
                s_g = float(structural_similarity_index_measure(render, gt, data_range=1.0, reduction="none")[0])
            rows.append({
                "run": run, "step": step, "model_sha256": sha, "scene_id": scene_id, "trajectory": traj, "frame": f,
                "input_views": len(forward) + 1, "gaussians": gaussians.num, "psnr_teacher": p_t, "ssim_teacher": s_t,
                "psnr_gt": p_g, "ssim_gt": s_g, "lpips_teacher": l_t, "lpips_gt": l_g,
            })  # fmt: skip
    return rows


def decoder_frame_rows(store: RunStore, run: TrainRun, step: int, model, sha: str) -> list[dict[str, Any]]:
    """Validation rows of a training run: :func:`scene_decoder_rows` over its held-out scenes."""
    views = ViewCache(store, size=8)
    loss = run.config.loss
    lpips = make_lpips(loss.lpips_weights, backbone_path=loss.lpips_backbone) if loss.lpips_weights else None
    index = index_dataset(store).scenes  # read once for all held-out scenes
    rows: list[dict[str, Any]] = []
    for sid in run.val_scenes:
        rows += scene_decoder_rows(store, sid, model, sha=sha, run=run.name, step=step,
                                   stride=run.config.eval_frame_stride, backend=run.config.backend, views=views,
                                   lpips=lpips, index=index)
    return rows


@task(name="evaluate-checkpoint", **STAGE_TASK_OPTIONS)
def evaluate_checkpoint_scene(store_url: str, checkpoint: str, scene_id: str, stride: int = 1,
                              lpips_weights: str | None = None, lpips_backbone: str | None = None) -> dict[str, Any]:
    """Metrics of any decoder checkpoint on one scene, ``eval/decoder/<sha[:16]>/<scene>.parquet`` (skipped when
    that file exists: it is named by the checkpoint's content)."""
    import hashlib
    from pathlib import Path

    store = RunStore(store_url, create=False)
    data = Path(checkpoint).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    kind = f"decoder/{sha[:16]}"
    if store.read_scene_table(kind, scene_id) is not None:
        return {"scene_id": scene_id, "computed": False}
    model = load_decoder_bytes(data, checkpoint)
    lpips = make_lpips(lpips_weights, backbone_path=lpips_backbone) if lpips_weights else None
    rows = scene_decoder_rows(store, scene_id, model, sha=sha, run=Path(checkpoint).parent.name, step=-1,
                              stride=stride, lpips=lpips)
    store.write_scene_table(kind, scene_id, pa.Table.from_pylist(rows, schema=EVAL_SCHEMA))
    return {"scene_id": scene_id, "computed": True}


@task(name="evaluate-quality", **STAGE_TASK_OPTIONS)
def evaluate_quality_scene(store_url: str, checkpoint: str, scene_id: str, methods: list[str] | None = None,
                           lpips_weights: str | None = None, lpips_backbone: str | None = None) -> dict[str, Any]:
    """The decoder beside the no-learning baselines on one procedural scene (``lyra_pipeline.quality``), in
    ``eval/quality/<sha[:16]>/<scene>.parquet``; only the methods that file lacks are computed (none: no work)."""
    import hashlib
    from pathlib import Path

    store = RunStore(store_url, create=False)
    data = Path(checkpoint).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    kind = f"quality/{sha[:16]}"
    old = store.read_scene_table(kind, scene_id)
    done = set(old.column("method").to_pylist()) if old is not None else set()
    todo = [m for m in available_methods(methods or list(CHEAP_METHODS)) if m not in done]
    if not todo:
        return {"scene_id": scene_id, "computed": False}
    model = load_decoder_bytes(data, checkpoint)
    lpips = make_lpips(lpips_weights, backbone_path=lpips_backbone) if lpips_weights else None
    rows = scene_quality_rows(store, scene_id, model, methods=todo, lpips=lpips, sha=sha)
    if not rows:  # no exact ground truth (image scene)
        return {"scene_id": scene_id, "computed": False}
    table = pa.Table.from_pylist(rows, schema=QUALITY_SCHEMA)
    store.write_scene_table(kind, scene_id, pa.concat_tables([old, table]) if old is not None else table)
    return {"scene_id": scene_id, "computed": True, "methods": todo}


@task(name="evaluate-decoder", **STAGE_TASK_OPTIONS)
def evaluate_decoder(store_url: str, run_name: str, step: int) -> dict[str, Any]:
    """Validation metrics of checkpoint ``step`` on the held-out scenes, in ``train/<run>/eval.parquet``.

    Skipped when that file already holds the metrics of the same checkpoint (same model sha256)."""
    store = RunStore(store_url, create=False)
    run = load_run(store, run_name)
    rel_state = RunStore.checkpoint_rel(run.name, step, "state.json")
    sha = json.loads(store.read_file(rel_state))["sha256"]["model.safetensors"]
    rel = RunStore.train_rel(run.name, "eval.parquet")
    old = store.read_table(rel)
    if old is not None and old.num_rows and set(old.column("model_sha256").to_pylist()) == {sha}:
        return summarize_decoder(old.to_pylist()) | {"computed": False}
    pin_torch_threads(run.config.torch_threads)  # as when it follows training in-process, also after a resume
    t0 = time.perf_counter()
    model_rel = RunStore.checkpoint_rel(run.name, step, "model.safetensors")
    model = load_decoder_bytes(store.read_file(model_rel), f"{store.url}/{model_rel}").to(run.config.device)
    rows = decoder_frame_rows(store, run, step, model, sha)
    store.write_table(rel, pa.Table.from_pylist(rows, schema=EVAL_SCHEMA))
    return summarize_decoder(rows) | {"computed": True, "seconds": time.perf_counter() - t0}


def summarize_decoder(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean PSNR/SSIM over validation frames (frame 0, the input view, included as Lyra's evaluation does)."""

    def mean(key: str) -> float:
        vals = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else math.nan

    return {"frames": len(rows), "scenes": len({r["scene_id"] for r in rows}),
            "psnr_teacher": mean("psnr_teacher"), "ssim_teacher": mean("ssim_teacher"),
            "psnr_gt": mean("psnr_gt"), "ssim_gt": mean("ssim_gt"),
            "lpips_teacher": mean("lpips_teacher"), "lpips_gt": mean("lpips_gt")}
