"""Prefect tasks of teacher fine-tuning: plan a run, train one chunk, evaluate on held-out scenes, export.

Coarse tasks with small dict results; the training state travels through the store's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from lyra_pipeline.retries import STAGE_TASK_OPTIONS
from lyra_pipeline.storage import RunStore
from lyra_pipeline.teacher_training import (
    TeacherTrainConfig,
    evaluate_teacher,
    export_teacher,
    plan_teacher_run,
    train_teacher_until,
)


@task(name="plan-teacher", **STAGE_TASK_OPTIONS)
def plan_teacher(store_url: str, config: TeacherTrainConfig, preset: str = "") -> dict[str, Any]:
    """Create (or find) the teacher run for this config and the store's oracle pairs; record its split."""
    store = RunStore(store_url, create=False)
    store.check_writable()  # a read-only store fails here, before any training
    run = plan_teacher_run(store, config, preset)
    return {"run": run.name, "train_scenes": run.train_scenes, "val_scenes": run.val_scenes,
            "total_steps": config.steps}


@task(name="train-teacher-chunk", **STAGE_TASK_OPTIONS)
def train_teacher_chunk(store_url: str, run_name: str, until_step: int) -> dict[str, Any]:
    """Train from the newest checkpoint up to ``until_step`` steps (no-op when already there)."""
    return train_teacher_until(store_url, run_name, until_step)


@task(name="evaluate-teacher", **STAGE_TASK_OPTIONS)
def evaluate_teacher_task(store_url: str, run_name: str, step: int) -> dict[str, Any]:
    """Teacher vs warp-only vs oracle on the held-out scenes (``train/<run>/eval.parquet``)."""
    return evaluate_teacher(store_url, run_name, step)


@task(name="export-teacher", **STAGE_TASK_OPTIONS)
def export_teacher_task(store_url: str, run_name: str, step: int, metrics: dict[str, Any],
                        out: str | None = None) -> str:
    """The finished teacher folder in the store (``train/<run>/model/``) and optionally in ``out``."""
    return export_teacher(store_url, run_name, step, metrics, Path(out) if out else None)
