"""Per-scene refinement flow: one stored scene's Gaussians optimised against its teacher frames, then exported.

Each chunk of ``checkpoint_every`` steps is one task resuming from the newest checkpoint, so a killed flow re-run
continues where it stopped (to the same bytes), and a finished refinement re-run computes nothing.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.generate_dataset import DEFAULT_STORE
from lyra_pipeline.reconstruct import ExportOptions
from lyra_pipeline.refine import RefineConfig, chunk_ends
from tasks.refine import export_refinement, finish_refinement, plan_refinement, refine_chunk


@flow(name="refine-scene")
def refine_scene(
    scene: str,
    store: str = DEFAULT_STORE,
    steps: int = 300,
    init: str = "auto",
    background: str = "random",
    checkpoint: str | None = None,
    out: str | None = None,
    html: bool = False,
    export: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Refine ``scene`` of ``store`` for ``steps`` steps from ``init`` (``auto``/``decoder``/``rgbd``); write the
    PLY (+ strip, + ``html`` viewer) to ``out`` when given, with ``export`` options (prune_ratio, min_opacity,
    layout, smoothing)."""
    logger = get_run_logger()
    config = RefineConfig(steps=steps, init=init, background=background)
    options = ExportOptions(**(export or {}))
    # 1. The refinement: named by the scene's data, the initial Gaussians and the config.
    plan = plan_refinement(store, scene, config, checkpoint)
    logger.info("refinement %s of %s from %s", plan["name"], scene, plan["init"])
    # 2. Chunks of optimiser steps, each resuming from the newest checkpoint.
    chunks = [refine_chunk(store, scene, plan["name"], end) for end in chunk_ends(config)]
    # 3. The refined Gaussians, scored before/after on the teacher frames it did not fit.
    result = finish_refinement(store, scene, plan["name"])
    result["steps_computed"] = sum(c["computed"] for c in chunks)
    create_table_artifact(key="refinement", table=[{"scene": scene, "name": plan["name"], "init": result["init"],
                                                    "steps": steps, **{f"psnr_{k}_before": v for k, v in
                                                                       result["psnr_before"].items()},
                                                    **{f"psnr_{k}_after": v for k, v in result["psnr_after"].items()}}],
                          description=f"Refinement of {scene} in {store}: PSNR on the unfitted teacher frames")
    # 4. The PLY a viewer opens.
    if out is not None:
        result["export"] = export_refinement(store, scene, plan["name"], out, html, options)
    return result
