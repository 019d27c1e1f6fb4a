"""The dataset-evaluation flow: per-frame quality of a generated dataset against exact ground truth.

Metrics land in ``eval/frames/<scene_id>.parquet`` (one row per scene x trajectory x frame) and
``eval/dataset_summary.parquet`` (per trajectory and overall), and in a Prefect table artifact. With a decoder
checkpoint, its rows go to ``eval/decoder/<sha16>/`` and, for procedural scenes, the decoder-quality table (the
decoder beside the flat / RGB-D / ceiling baselines, optionally per-scene optimisation, on trajectory frames and
held-out cameras) to ``eval/quality/<sha16>/``. Re-running on an unchanged store does no work.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ThreadPoolTaskRunner

from flows.generate_dataset import DEFAULT_STORE, PipelineFailed
from lyra_ops.errors import LyraInputError
from lyra_pipeline.quality import CHEAP_METHODS, OPTIMIZED_METHODS, quality_table
from lyra_pipeline.stages import plan_keys
from lyra_pipeline.store.dataset import bind
from lyra_pipeline.store.runstore import RunStore
from tasks.evaluate import evaluate_scene, summarize_frames
from tasks.train import evaluate_checkpoint_scene, evaluate_quality_scene, summarize_decoder


@flow(name="evaluate-dataset", task_runner=ThreadPoolTaskRunner(max_workers=2))
def evaluate_dataset(
    store: str = DEFAULT_STORE,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    run_id: str | None = None,
    checkpoint: str | None = None,
    lpips_weights: str | None = None,
    lpips_backbone: str | None = None,
    baselines: bool = True,
    optimize: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate the dataset that ``generate-dataset`` wrote with the same preset and overrides, and, when a
    decoder ``checkpoint`` (model.safetensors) is given, that decoder on every scene; with ``baselines`` also its
    quality table beside the flat / RGB-D / ceiling baselines on procedural scenes (``optimize``: plus the
    per-scene optimisation baselines ``optimized_300`` / ``optimized_1000``, minutes per scene on a CPU)."""
    logger = get_run_logger()
    # 1. The scenes of the dataset: the store's own (dataset.json + these options; never rewritten here), those
    #    whose teacher frames are done (a failed scene is named, not evaluated).
    st = RunStore(store, create=False)
    binding = bind(st, preset, overrides or {}, command="evaluate")
    config = binding.config
    run_id = run_id or "eval-" + uuid.uuid4().hex[:8]
    scenes, missing = evaluable_scenes(st, config, binding.records)
    if missing:
        logger.warning("%d scene(s) without finished teacher frames are not evaluated: %s", len(missing),
                       ", ".join(missing[:20]))
    progress = create_progress_artifact(progress=0.0, description=f"evaluating {len(scenes)} scenes of {store}")
    # 2. Per-scene metrics against ground truth (skipped where already computed for these inputs).
    futures = [evaluate_scene.submit(store, config, s, run_id) for s in scenes]
    decoder = [evaluate_checkpoint_scene.submit(store, checkpoint, s.scene_id, 1, lpips_weights, lpips_backbone)
               for s in scenes] if checkpoint else []
    methods = [*CHEAP_METHODS, *(OPTIMIZED_METHODS if optimize else ())]
    procedural = [s for s in scenes if s.source == "procedural"] if checkpoint and baselines else []
    quality = [evaluate_quality_scene.submit(store, checkpoint, s.scene_id, methods, lpips_weights, lpips_backbone)
               for s in procedural]
    done = 0
    for fut in [*futures, *decoder, *quality]:
        fut.wait()
        done += 1
        update_progress_artifact(progress, progress=100.0 * done / (len(futures) + len(decoder) + len(quality)))
    failed = [s.scene_id for s, f in zip(scenes, futures, strict=True) if not f.state.is_completed()]
    failed += [s.scene_id for s, f in zip(scenes, decoder, strict=False) if not f.state.is_completed()]
    failed += [s.scene_id for s, f in zip(procedural, quality, strict=True) if not f.state.is_completed()]
    # 3. Aggregate per trajectory and overall; publish as a table and a Prefect artifact.
    st = RunStore(store)
    st.compact_manifest()
    ids = {s.scene_id for s in scenes}
    frames = st.read_tables("frames")
    if frames.num_rows:
        frames = frames.filter(pa.compute.is_in(frames["scene_id"], value_set=pa.array(sorted(ids))))
    summary = summarize_frames(frames)
    st.write_summary_table("dataset", pa.Table.from_pylist(summary))
    create_table_artifact(key="dataset-quality", table=summary,
                          description=f"Dataset quality of {store} ({len(scenes)} scenes) against ground truth")
    # 4. A contact sheet of the first scene in the Prefect UI.
    if scenes:
        create_markdown_artifact(key="dataset-contact-sheet", markdown=contact_sheet_markdown(st, scenes[0].scene_id),
                                 description=f"Contact sheet of {scenes[0].scene_id}")
    # 5. The decoder checkpoint's metrics, when one was given, and its table beside the baselines.
    if checkpoint:
        summary += decoder_summary(st, checkpoint)
    if procedural:
        summary += quality_summary(st, checkpoint, {s.scene_id for s in procedural})
    logger.info("evaluated %d scenes, %d frames", len(scenes), frames.num_rows)
    if failed:
        raise PipelineFailed(f"evaluation failed for {failed}; see `lyra status --store {store} --failed`")
    return summary


def evaluable_scenes(store: RunStore, config, records: list) -> tuple[list, list[str]]:
    """The scenes whose every trajectory's ``generate`` unit is done under this config, and the ids of the
    others. None at all is one clear error (there is nothing to evaluate), before anything is written."""
    done = store.done_keys()
    ready, missing = [], []
    for scene in records:
        keys = plan_keys(config, scene)
        ok = all(done.get((scene.scene_id, t, "generate")) == keys.key("generate", t) for t in config.trajectory_names)
        (ready if ok else missing).append(scene if ok else scene.scene_id)
    if not ready:
        raise LyraInputError(f"{store.url}: no scene has finished teacher frames under the store's config "
                             f"({len(missing)} scene(s) pending or failed: `lyra status --store {store.url} "
                             "--failed`); nothing to evaluate")
    return ready, missing


def contact_sheet_markdown(store: RunStore, scene_id: str) -> str:
    """Markdown with the scene's contact sheet inlined as a PNG data URI (rendered by the Prefect UI)."""
    import base64
    import io

    from lyra_pipeline.inspect import contact_sheet

    sheet = contact_sheet(store, scene_id, None, 2)
    sheet.thumbnail((1200, 1200))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f"### {scene_id}\n\nInput, depth, seams; per trajectory: warped, splat mask, refined mask, warped x "
            f"refined, teacher.\n\n![contact sheet](data:image/png;base64,{data})\n")


def decoder_summary(store: RunStore, checkpoint: str) -> list[dict[str, Any]]:
    """One summary row of a decoder checkpoint over the scenes evaluated with it (``eval/decoder/<sha16>``)."""
    import hashlib
    from pathlib import Path

    sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    rows = store.read_tables(f"decoder/{sha[:16]}").to_pylist()
    row = {"group": f"decoder {sha[:12]}", **summarize_decoder(rows)}
    store.write_summary_table(f"decoder_{sha[:16]}", pa.Table.from_pylist([row]))
    create_table_artifact(key="decoder-quality", table=[row], description=f"Decoder {checkpoint} on {store}")
    return [row]


def quality_summary(store: RunStore, checkpoint: str, scene_ids: set[str]) -> list[dict[str, Any]]:
    """One row per (split, method) of a checkpoint's quality table over ``scene_ids`` (``eval/quality/<sha16>``),
    written to ``eval/quality_<sha16>_summary.parquet`` and published as a Prefect table artifact."""
    import hashlib
    from pathlib import Path

    sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    rows = [r for r in store.read_tables(f"quality/{sha[:16]}").to_pylist() if r["scene_id"] in scene_ids]
    table = quality_table(rows)
    if table:
        store.write_summary_table(f"quality_{sha[:16]}", pa.Table.from_pylist(table))
        create_table_artifact(key="decoder-quality-table", table=table,
                              description=f"Decoder {checkpoint} beside no-learning baselines on {store.url}")
    return table
