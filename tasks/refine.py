"""Prefect tasks of per-scene refinement: plan, one chunk of optimiser steps, finish, export.

Thin wrappers of :mod:`lyra_pipeline.refine`: the state travels through the store's checkpoints, tasks return
small dicts.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from lyra_pipeline.reconstruct import ExportOptions, export_refined, resolve_decoder
from lyra_pipeline.refine import RefineConfig, finish_refine, plan_refine, refine_until
from lyra_pipeline.retries import STAGE_TASK_OPTIONS
from lyra_pipeline.storage import RunStore


@task(name="plan-refine", **STAGE_TASK_OPTIONS)
def plan_refinement(store_url: str, scene_id: str, config: RefineConfig, checkpoint: str | None = None) -> dict:
    """Create (or find) the refinement: its initial Gaussians (the decoder's unless ``init`` is ``rgbd``)."""
    store = RunStore(store_url, create=False)
    model, source = (None, "") if config.init == "rgbd" else resolve_decoder(store, checkpoint)
    plan = plan_refine(store, scene_id, config, model, source)
    return {"name": plan.name, "init": plan.init, "trajectories": plan.trajectories}


@task(name="refine-chunk", **STAGE_TASK_OPTIONS)
def refine_chunk(store_url: str, scene_id: str, name: str, until: int) -> dict[str, Any]:
    """Optimise from the newest checkpoint up to step ``until`` (no-op when already there)."""
    return refine_until(RunStore(store_url, create=False), scene_id, name, until)


@task(name="finish-refine", **STAGE_TASK_OPTIONS)
def finish_refinement(store_url: str, scene_id: str, name: str) -> dict[str, Any]:
    """The refined Gaussians and the before/after PSNR on the unfitted teacher frames."""
    return finish_refine(RunStore(store_url, create=False), scene_id, name)


@task(name="export-refined")
def export_refinement(store_url: str, scene_id: str, name: str, out: str, html: bool,
                      options: ExportOptions) -> dict[str, Any]:
    res = export_refined(RunStore(store_url, create=False), scene_id, name, out, html=html, options=options)
    return {"ply": str(res.ply), "strip": str(res.strip) if res.strip else None,
            "html": str(res.html) if res.html else None, "gaussians": res.gaussians}
