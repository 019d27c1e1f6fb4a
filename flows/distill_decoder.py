"""The decoder self-distillation flow: train the 3DGS decoder on a store's teacher videos, then validate it.

Each chunk of ``checkpoint_every`` steps is one task that resumes from the newest checkpoint, so a killed
flow re-run continues where it stopped (to the same weights), and a finished run re-run does nothing.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from flows.generate_dataset import DEFAULT_STORE
from lyra_pipeline.runner import check_world_size
from lyra_pipeline.storage import RunStore
from lyra_pipeline.training import build_train_config, chunk_ends, final_checkpoint, load_run, write_latest
from tasks.distributed import train_distributed
from tasks.train import evaluate_decoder, plan_training, train_chunk


@flow(name="distill-decoder")
def distill_decoder(
    store: str = DEFAULT_STORE,
    preset: str = "smoke",
    overrides: dict[str, Any] | None = None,
    nproc: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the decoder for ``preset`` + ``overrides`` on ``store``.

    ``nproc`` processes per node on ``nnodes`` nodes (> 1 in all): one torchrun job (DDP) that splits each step's
    ``batch`` samples over the ranks; multi-node jobs meet at ``rdzv_endpoint`` (HOST:PORT)."""
    logger = get_run_logger()
    config = build_train_config(preset, overrides)
    world = check_world_size(nproc, nnodes, config.batch, "train.batch")
    # 1. The run: named by the config and the dataset's content; the train/val split by scene is fixed in it.
    plan = plan_training(store, config)
    run_name = plan["run"]
    logger.info("run %s: %d train / %d val scenes, %d steps", run_name, len(plan["train_scenes"]),
                len(plan["val_scenes"]), plan["total_steps"])
    # 2. Progressive stages, one task per checkpoint interval (each resumes from the newest checkpoint).
    ends = chunk_ends(config)
    progress = create_progress_artifact(progress=0.0, description=f"training {run_name} ({ends[-1]} steps)")
    interrupted: list[str] = []
    if world > 1:
        job = train_distributed(store, "decoder", run_name, nproc=nproc, nnodes=nnodes,
                                rdzv_endpoint=rdzv_endpoint, total_steps=ends[-1], progress_id=progress)
        computed, interrupted = job["computed"], job.get("interrupted", [])
    else:
        computed = 0
        for end in ends:
            computed += train_chunk(store, run_name, end)["computed"]
            update_progress_artifact(progress, progress=100.0 * end / ends[-1])
    # 3. Validation on the held-out scenes against the teacher frames and the exact ground truth.
    st = RunStore(store, create=False)
    run = load_run(st, run_name)
    step = final_checkpoint(st, run)
    metrics = evaluate_decoder(store, run_name, step) if run.val_scenes else {}
    # 4. Publish: train/latest.json points at this decoder; a Prefect artifact shows the numbers.
    write_latest(st, run, step)
    summary = {"run": run_name, "step": step, "steps_computed": computed, "world_size": world, **metrics}
    create_table_artifact(key="decoder-validation", table=[summary],
                          description=f"Decoder {run_name} on the held-out scenes of {store}")
    logger.info("decoder %s: %s", run_name, summary)
    return {**summary, "interrupted": interrupted}  # killed ranks the job's retries resumed from (lines)


@flow(name="retrain-decoder")
def retrain_decoder(store: str = DEFAULT_STORE, preset: str = "default", overrides: dict[str, Any] | None = None,
                    nproc: int = 1, nnodes: int = 1, rdzv_endpoint: str | None = None) -> dict[str, Any]:
    """Scheduled retraining: train on the store's newest dataset (a run named by its content: an unchanged
    dataset finds its finished run and does nothing; new scenes start a new run)."""
    return distill_decoder(store=store, preset=preset, overrides=overrides, nproc=nproc, nnodes=nnodes,
                           rdzv_endpoint=rdzv_endpoint)
