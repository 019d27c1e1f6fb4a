"""The dataset-evaluation flow: per-frame quality of a generated dataset against exact ground truth.

Metrics land in ``eval/frames/<scene_id>.parquet`` (one row per scene x trajectory x frame) and
``eval/dataset_summary.parquet`` (per trajectory and overall), and in a Prefect table artifact.
Re-running on an unchanged store does no work.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.generate_dataset import DEFAULT_STORE, PipelineFailed
from lyra_pipeline.config import build_config
from lyra_pipeline.storage import RunStore
from tasks.evaluate import evaluate_scene, summarize_frames
from tasks.sdg import sample_prompts


@flow(name="evaluate-dataset", task_runner=ThreadPoolTaskRunner(max_workers=2))
def evaluate_dataset(
    store: str = DEFAULT_STORE,
    preset: str = "smoke",
    overrides: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the dataset that ``generate-dataset`` wrote with the same preset and overrides."""
    logger = get_run_logger()
    config = build_config(preset, overrides)
    run_id = run_id or "eval-" + uuid.uuid4().hex[:8]
    # 1. The scenes of the dataset (the same seeded list generate-dataset recorded).
    scenes = sample_prompts(store, config)
    # 2. Per-scene metrics against ground truth (skipped where already computed for these inputs).
    futures = [evaluate_scene.submit(store, config, s, run_id) for s in scenes]
    wait(futures)
    failed = [s.scene_id for s, f in zip(scenes, futures, strict=True) if not f.state.is_completed()]
    # 3. Aggregate per trajectory and overall; publish as a table and a Prefect artifact.
    st = RunStore(store)
    ids = {s.scene_id for s in scenes}
    frames = st.read_tables("frames")
    if frames.num_rows:
        frames = frames.filter(pa.compute.is_in(frames["scene_id"], value_set=pa.array(sorted(ids))))
    summary = summarize_frames(frames)
    st.write_summary_table("dataset", pa.Table.from_pylist(summary))
    create_table_artifact(key="dataset-quality", table=summary,
                          description=f"Dataset quality of {store} ({len(scenes)} scenes) against ground truth")
    logger.info("evaluated %d scenes, %d frames", len(scenes), frames.num_rows)
    if failed:
        raise PipelineFailed(f"evaluation failed for {failed}; see `lyra status --store {store} --failed`")
    return summary
