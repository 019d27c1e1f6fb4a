"""The teacher fine-tuning flow: learn GEN3C's conditioning from exact pairs of an oracle store.

Recipe: plan (run named by config + dataset, split by scene) -> one task per checkpoint interval (each resumes
from the newest checkpoint) -> held-out evaluation against the warp-only baseline and the oracle -> the
teacher folder (``generator.backend: tiny``, ``generator.model_path: <folder>``). A finished run re-run does
nothing.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from flows.generate_dataset import DEFAULT_STORE
from lyra_pipeline.runner import check_world_size
from lyra_pipeline.storage import RunStore
from lyra_pipeline.teacher_training import (
    build_teacher_config,
    final_teacher_step,
    load_teacher_run,
    teacher_chunk_ends,
)
from tasks.distributed import train_distributed
from tasks.teacher import evaluate_teacher_task, export_teacher_task, plan_teacher, train_teacher_chunk


@flow(name="train-teacher")
def train_teacher(
    store: str = DEFAULT_STORE,
    preset: str = "smoke",
    overrides: dict[str, Any] | None = None,
    export_to: str | None = None,
    nproc: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    parallel: str = "ddp",
) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the camera-conditioned teacher for ``preset`` + ``overrides``;
    ``nproc`` x ``nnodes`` > 1: one torchrun job whose ranks take the config's sampling ``streams``, the model
    replicated (``parallel`` ddp) or sharded over them (fsdp: FSDP2, for video models too large for one GPU)."""
    logger = get_run_logger()
    config = build_teacher_config(preset, overrides)
    world = check_world_size(nproc, nnodes, config.streams, "teacher streams")
    # 1. The run: named by the config and the store's oracle pairs; the split by scene is fixed in it.
    plan = plan_teacher(store, config, preset)
    run_name = plan["run"]
    logger.info("teacher run %s: %d train / %d val scenes, %d steps", run_name, len(plan["train_scenes"]),
                len(plan["val_scenes"]), plan["total_steps"])
    # 2. Training, one task per checkpoint interval.
    ends = teacher_chunk_ends(config)
    progress = create_progress_artifact(progress=0.0, description=f"training {run_name} ({ends[-1]} steps)")
    if world > 1:
        job = train_distributed(store, "teacher", run_name, nproc=nproc, nnodes=nnodes,
                                rdzv_endpoint=rdzv_endpoint, total_steps=ends[-1], progress_id=progress,
                                parallel=parallel)
        computed = job["computed"]
    else:
        computed = 0
        for end in ends:
            computed += train_teacher_chunk(store, run_name, end)["computed"]
            update_progress_artifact(progress, progress=100.0 * end / ends[-1])
    step = final_teacher_step(RunStore(store, create=False), load_teacher_run(RunStore(store, create=False), run_name))
    # 3. Held-out scenes: teacher vs warp-only vs oracle, on disoccluded pixels and whole frames.
    metrics = evaluate_teacher_task(store, run_name, step) if plan["val_scenes"] else {}
    # 4. The teacher folder, in the store and where asked.
    folder = export_teacher_task(store, run_name, step, metrics, export_to)
    summary = {"run": run_name, "step": step, "steps_computed": computed, "model": folder, **metrics}
    create_table_artifact(key="teacher-validation", table=[summary],
                          description=f"Tiny teacher {run_name} on the held-out scenes of {store}")
    logger.info("teacher %s: %s", run_name, summary)
    return summary
