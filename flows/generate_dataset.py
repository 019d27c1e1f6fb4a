"""The synthetic-data-generation flow: prompts -> first frames -> depth -> cameras -> warp -> masks -> teacher
-> latents -> teacher-frame depth.

By default every task runs all stages of one scene (``compute.tasks: scene``; ``stage``: one task per stage
of each scene). Each stage skips work whose content key is already recorded as done, so a re-run after a crash
(or on a finished store) only does what is missing.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.task_runners import ThreadPoolTaskRunner

from lyra_pipeline.cluster import GPU_RESOURCE
from lyra_pipeline.planning import plan_scenes
from lyra_pipeline.stages import StageReport, finished_scenes, plan_fingerprint, scene_units
from lyra_pipeline.store.dataset import bind
from lyra_pipeline.store.runstore import RunStore, store_exists
from tasks.sdg import (
    encode_latents,
    estimate_depth,
    estimate_video_depth,
    generate_video,
    make_cameras,
    make_input,
    process_scene,
    refine_masks,
    sample_prompts,
    warp_frames,
)

DEFAULT_STORE = "./lyra_store"


class PipelineFailed(RuntimeError):
    """Some scenes failed; the others completed. Details are in the manifest (`lyra status --failed`)."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


@flow(name="generate-dataset", task_runner=ThreadPoolTaskRunner(max_workers=2))
def generate_dataset(
    store: str = DEFAULT_STORE,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    run_id: str | None = None,
    scene_ids: list[str] | None = None,
    gpu_stages: bool = False,
) -> dict[str, Any]:
    """Generate (or complete) a dataset in ``store`` from a preset plus config overrides.

    ``scene_ids`` restricts the run to those scenes of the sampled list (``lyra retry`` passes the failed ones).
    ``gpu_stages`` (Dask task runners whose GPU workers offer resource ``GPU=1``): video generation, and depth
    stages configured on CUDA, run only on GPU workers (``lyra_pipeline.cluster``); with ``compute.tasks: scene``
    whole scene tasks do.
    """
    logger = get_run_logger()
    # The store's own dataset (dataset.json) is the base of the config; options that change its scene list are
    # refused here, before anything is written (lyra_pipeline.store.dataset).
    # plan_scenes runs the run-wide checks (preflight) and gives the scene list in one pass over the inputs.
    binding = bind(RunStore(store, create=False) if store_exists(store) else None, preset, overrides or {},
                   command="run", plan=plan_scenes)
    config, preset, overrides = binding.config, binding.preset, binding.overrides
    run_id = run_id or new_run_id()
    started = time.time()
    RunStore(store).check_writable()  # a read-only store fails here, before any work
    removed = RunStore(store).clean_partial_files()
    if removed:
        logger.info("removed %d temporary files left by an interrupted run", removed)

    def each(task, scenes, after: list[PrefectFuture] | None = None, gpu: bool = False) -> list[PrefectFuture]:
        """Submit ``task`` once per scene, each after that scene's upstream future(s); ``gpu``: on GPU workers."""
        waits = after or [None] * len(scenes)
        with dask.annotate(resources=GPU_RESOURCE) if gpu and gpu_stages else nullcontext():
            return [task.submit(store, config, s, run_id, wait_for=[w] if w is not None else None)
                    for s, w in zip(scenes, waits, strict=True)]

    # 1. Sample prompts: the scene list, reproducible from the run seed, recorded in prompts.parquet.
    scenes = sample_prompts(store, config, preset, overrides, binding.records)
    if scene_ids is not None:
        scenes = [s for s in scenes if s.scene_id in set(scene_ids)]
    # Scenes whose every unit is done under the current keys need no task at all (a finished batch resumes in
    # the time it takes to read the manifest index).
    finished = finished_scenes(RunStore(store), config, scenes)
    reused = len(finished) * len(scene_units(config))
    scenes = [s for s in scenes if s.scene_id not in finished]
    if config.compute.tasks == "scene":
        # 2-8. One task per scene runs its stages in order (the recipe below, ``process_scene``). Each run starts
        # at its own place in the scene list, so concurrent runs on one store rarely wait on each other's leases.
        start = int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % max(len(scenes), 1)
        scenes = scenes[start:] + scenes[:start]
        with dask.annotate(resources=GPU_RESOURCE) if gpu_stages else nullcontext():  # whole scenes on GPU workers
            futures = [process_scene.submit(store, config, s, run_id) for s in scenes]
        progress = create_progress_artifact(progress=0.0, description=f"{len(scenes)} scenes")
        for i, fut in enumerate(as_completed(futures)):
            fut.wait()  # records the final state on the future (else .state asks the API, which may lag)
            update_progress_artifact(progress, progress=100.0 * (i + 1) / len(futures))
        outcome = {s.scene_id: f.result() if f.state.is_completed() else None
                   for s, f in zip(scenes, futures, strict=True)}
    else:
        # 2. First frames: procedural renders or user images, cover-cropped to the video size.
        inputs = each(make_input, scenes)
        # 3. Depth of the first frame (exact for procedural scenes), cleaned up and edge-filtered.
        depth = each(estimate_depth, scenes, after=inputs, gpu=config.depth.device.startswith("cuda"))
        # 4. Camera trajectories (Lyra's six paths or a custom one), seeded per scene and path.
        #    (Stages of one scene run one after another: one writer per scene's manifest.)
        cameras = each(make_cameras, scenes, after=depth)
        # 5. Forward warping of the first frame into every trajectory frame.
        warps = each(warp_frames, scenes, after=cameras)
        # 6. Conservative mask refinement against the seam mesh.
        masks = each(refine_masks, scenes, after=warps)
        # 7. Teacher video: the generator conditioned on warped frames and refined masks.
        teacher = each(generate_video, scenes, after=masks, gpu=True)
        # 8. Latents of the teacher video: what the 3DGS decoder reads.
        latents = each(encode_latents, scenes, after=teacher)
        # 9. Depth of every teacher frame (Lyra: ViPE): the decoder's depth supervision.
        video_depth = each(estimate_video_depth, scenes, after=latents, gpu=config.depth.device.startswith("cuda"))

        by_stage = [inputs, depth, cameras, warps, masks, teacher, latents, video_depth]
        progress = create_progress_artifact(progress=0.0, description=f"{len(scenes)} scenes x {len(by_stage)} "
                                                                      "stages")
        for i, futs in enumerate(by_stage):  # stage by stage, in DAG order
            wait(futs)
            update_progress_artifact(progress, progress=100.0 * (i + 1) / len(by_stage))
        outcome = {}
        for j, scene in enumerate(scenes):
            futs = [stage[j] for stage in by_stage]
            done = all(f.state.is_completed() for f in futs)
            outcome[scene.scene_id] = [f.state.result() for f in futs] if done else None
    # one index file: `lyra status` stays fast at 1M scenes; a run that finished every scene of the store's list
    # stamps it complete under this plan, so the next `lyra run` of the same config answers from the index footer
    complete = None
    if scene_ids is None and all(v is not None for v in outcome.values()):
        complete = {"plan": plan_fingerprint(config), "since": started, "run_id": run_id}
    RunStore(store).compact_manifest(complete=complete)
    summary = summarize(run_id, preset, config.model_dump(mode="json"), store, outcome, started)
    summary["skipped"] += reused
    summary["overrides"] = overrides  # with ``preset``: the run's inputs (``lyra retry`` re-runs failures with them)
    summary["scenes_already_done"] = len(finished)
    RunStore(store).write_run_summary(run_id, summary)
    logger.info("run %s: computed %d, reused %d, failed scenes %d", run_id, summary["computed"],
                summary["skipped"], len(summary["failed_scenes"]))
    if summary["failed_scenes"]:
        raise PipelineFailed(f"{len(summary['failed_scenes'])} scene(s) failed: {summary['failed_scenes']}; "
                             f"see `lyra status --store {store} --failed`")
    return summary


def summarize(run_id: str, preset: str, config: dict[str, Any], store: str,
              outcome: dict[str, list[StageReport] | None], started: float) -> dict[str, Any]:
    """Counts of computed / reused units per stage, and the scenes whose tasks did not complete (``None``)."""
    computed: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for reports in outcome.values():
        for rep in reports or []:
            computed[rep.stage] += rep.computed
            skipped[rep.stage] += rep.skipped
    return {
        "run_id": run_id, "preset": preset, "config": config, "store": store,
        "started_at": started, "finished_at": time.time(),
        "computed": sum(computed.values()), "skipped": sum(skipped.values()),
        "computed_by_stage": dict(computed), "skipped_by_stage": dict(skipped),
        "failed_scenes": sorted(s for s, reports in outcome.items() if reports is None),
    }
