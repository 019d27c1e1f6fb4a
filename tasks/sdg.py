"""Prefect tasks of synthetic data generation: one task run = one stage of one scene (all its trajectories).

Each task: plan its key, skip if done, read its inputs from the store, call ``lyra_ops``, write, and return a
small ``StageReport``. ``lyra stage NAME`` calls the same functions through ``.fn`` without Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from prefect import task

from lyra_ops.cameras import Cameras, default_intrinsics
from lyra_ops.depth import ConstantDepth, PlanarDepth, postprocess_depth
from lyra_ops.generation import OracleGenerator, WarpOnlyGenerator
from lyra_ops.images import from_signed, from_uint8, to_signed, to_uint8
from lyra_ops.mask_refine import refine_mask_conservative
from lyra_ops.prompts import SceneRecord, procedural_scene_id, sample_records
from lyra_ops.scenes import make_scene
from lyra_ops.seeding import derive_seed, numpy_rng
from lyra_ops.trajectories import ALL_PATHS, draw_distance, load_trajectory, make_trajectory
from lyra_ops.warp import WarpResult, depth_reliability_mask, forward_warp, unproject_depth
from lyra_pipeline.config import RunConfig, edge_threshold, mesh_downsample
from lyra_pipeline.inputs import load_depth_file, load_image, scan_image_folder
from lyra_pipeline.stages import StageReport, StageRun, plan_keys, require_done
from lyra_pipeline.storage import RunStore

log = logging.getLogger(__name__)
IDENTITY = torch.eye(4)


def _frame_chunks(arr: np.ndarray) -> tuple[int, ...]:
    """One chunk per frame for (T, ...) arrays."""
    return (1, *arr.shape[1:])


def preflight(config: RunConfig) -> None:
    """Check run-wide inputs before any work starts (a bad custom trajectory would fail every scene)."""
    if config.trajectories.custom:
        trajectory_cameras(config, None, "custom", None)  # raises LyraInputError naming file/field/frame
    if config.scenes.source == "images":
        scan_image_folder(config.scenes.images_dir, config.seed)


# 1. Prompt sampling ---------------------------------------------------------------------------------------


def procedural_records(config: RunConfig) -> list[SceneRecord]:
    records = []
    for i in range(config.scenes.num_scenes):
        scene_id = procedural_scene_id(i)
        seed = derive_seed(config.seed, scene_id)
        scene = make_scene(seed, kind=config.scenes.scene_kind)
        sha = hashlib.sha256(json.dumps(scene.describe(), sort_keys=True).encode()).hexdigest()
        records.append(SceneRecord(scene_id, scene.prompt, None, sha, seed, "procedural"))
    return records


@task(name="sample-prompts")
def sample_prompts(store_url: str, config: RunConfig) -> list[SceneRecord]:
    """Seeded, order-independent scene list; recorded as ``prompts.parquet`` (rewritten only if it changed)."""
    if config.scenes.source == "procedural":
        records = procedural_records(config)
    else:
        bank = scan_image_folder(config.scenes.images_dir, config.seed)
        records = sample_records(bank, config.scenes.num_scenes, config.seed)
    RunStore(store_url).write_prompts([r.as_row() for r in records])
    return records


# 2. First frame -----------------------------------------------------------------------------------------------


@task(name="input")
def make_input(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    store, keys, v = RunStore(store_url), plan_keys(config, scene), config.video
    report = StageReport(scene.scene_id, "input")
    with StageRun(store, scene.scene_id, "", "input", keys.input, run_id, report) as run:
        if not run.skip:
            K = default_intrinsics(v.height, v.width, v.hfov_deg)
            if scene.source == "procedural":
                procedural = make_scene(scene.seed, kind=config.scenes.scene_kind)
                rgb = procedural.render(IDENTITY[None], K[None], v.height, v.width).rgb[0]
            else:
                rgb = load_image(scene.image_path, v.height, v.width, expected_sha=scene.content_sha)
            store.scene_group(scene.scene_id).attrs.update(scene.as_row())
            store.write_array(scene.scene_id, "input/rgb", to_uint8(rgb).numpy())
            store.write_array(scene.scene_id, "input/K", K.numpy())
    return report


# 3. Depth -----------------------------------------------------------------------------------------------------


def _estimate_depth(config: RunConfig, scene: SceneRecord, rgb: torch.Tensor, K: torch.Tensor):
    d = config.depth
    if d.backend == "procedural":
        procedural = make_scene(scene.seed, kind=config.scenes.scene_kind)
        render = procedural.render(IDENTITY[None], K[None], rgb.shape[-2], rgb.shape[-1])
        depth = render.depth[0, 0]
        return depth, depth > 0, "procedural (exact)"
    if d.backend == "file":
        path = Path(scene.image_path).with_suffix(".depth.npy")
        return load_depth_file(path, rgb.shape[-2], rgb.shape[-1]), None, f"file {path.name}"
    estimator = ConstantDepth(d.constant_value) if d.backend == "constant" else PlanarDepth(d.constant_value)
    pred = estimator.estimate(rgb, K)
    return pred.depth, pred.valid, pred.label


@task(name="depth")
def estimate_depth(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    store, keys = RunStore(store_url), plan_keys(config, scene)
    report = StageReport(scene.scene_id, "depth")
    with StageRun(store, scene.scene_id, "", "depth", keys.depth, run_id, report) as run:
        if not run.skip:
            require_done(store, scene.scene_id, "input", keys.input)
            rgb = from_uint8(torch.from_numpy(store.read_array(scene.scene_id, "input/rgb")))
            K = torch.from_numpy(store.read_array(scene.scene_id, "input/K"))
            raw, valid, label = _estimate_depth(config, scene, rgb, K)
            depth = postprocess_depth(raw, valid, config.depth.max_depth)
            reliable = depth_reliability_mask(depth, config.depth.edge_window, edge_threshold(config))
            store.write_array(scene.scene_id, "depth/depth", depth.numpy(), attrs={"label": label})
            store.write_array(scene.scene_id, "depth/reliable", reliable.numpy())
    return report


# 4. Camera trajectories ---------------------------------------------------------------------------------------


def trajectory_cameras(config: RunConfig, scene: SceneRecord | None, name: str,
                       K: torch.Tensor | None) -> tuple[Cameras, float]:
    v, t = config.video, config.trajectories
    if name == "custom":
        cams = load_trajectory(t.custom, height=v.height, width=v.width, num_frames=v.num_frames,
                               pose_scale=t.pose_scale)
        return cams, 0.0
    distance = draw_distance(ALL_PATHS[name], numpy_rng(scene.seed, "trajectory", name), t.distance_factor)
    cams = make_trajectory(name, K, v.height, v.width, v.num_frames, distance=distance,
                           center_depth=t.center_depth, lookat=t.lookat)
    return cams, distance


@task(name="cameras")
def make_cameras(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    store, keys = RunStore(store_url), plan_keys(config, scene)
    report = StageReport(scene.scene_id, "cameras", trajectories=config.trajectory_names)
    for name in config.trajectory_names:
        with StageRun(store, scene.scene_id, name, "cameras", keys.key("cameras", name), run_id, report) as run:
            if not run.skip:
                require_done(store, scene.scene_id, "input", keys.input)
                K = torch.from_numpy(store.read_array(scene.scene_id, "input/K"))
                cams, distance = trajectory_cameras(config, scene, name, K)
                base = f"trajectories/{name}/cameras"
                store.write_array(scene.scene_id, f"{base}/c2w", cams.c2w.numpy(), attrs={"distance": distance})
                store.write_array(scene.scene_id, f"{base}/K", cams.K.numpy())
    return report


def read_cameras(store: RunStore, scene_id: str, name: str, config: RunConfig) -> Cameras:
    base = f"trajectories/{name}/cameras"
    return Cameras(torch.from_numpy(store.read_array(scene_id, f"{base}/c2w")),
                   torch.from_numpy(store.read_array(scene_id, f"{base}/K")),
                   config.video.height, config.video.width)


# 5. Forward warping -------------------------------------------------------------------------------------------


@task(name="warp")
def warp_frames(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    store, keys, sid = RunStore(store_url), plan_keys(config, scene), scene.scene_id
    report = StageReport(sid, "warp", trajectories=config.trajectory_names)
    for name in config.trajectory_names:
        with StageRun(store, sid, name, "warp", keys.key("warp", name), run_id, report) as run:
            if run.skip:
                continue
            require_done(store, sid, "depth", keys.depth)
            require_done(store, sid, "cameras", keys.key("cameras", name), name)
            rgb = to_signed(from_uint8(torch.from_numpy(store.read_array(sid, "input/rgb"))))
            depth = torch.from_numpy(store.read_array(sid, "depth/depth"))
            reliable = torch.from_numpy(store.read_array(sid, "depth/reliable"))
            K = torch.from_numpy(store.read_array(sid, "input/K"))
            cams = read_cameras(store, sid, name, config)
            warp = forward_warp(rgb, depth, K, IDENTITY, cams.K, cams.w2c, source_mask=reliable,
                                depth_weight_scale=config.warp.depth_weight_scale)
            base = f"trajectories/{name}/warp"
            for field, arr in (("rgb", to_uint8(from_signed(warp.rgb))), ("depth", warp.depth), ("mask", warp.mask)):
                data = arr.numpy()
                store.write_array(sid, f"{base}/{field}", data, chunks=_frame_chunks(data))
    return report


# 6. Conservative mask refinement ------------------------------------------------------------------------------


@task(name="refine")
def refine_masks(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    store, keys, sid = RunStore(store_url), plan_keys(config, scene), scene.scene_id
    report = StageReport(sid, "refine", trajectories=config.trajectory_names)
    for name in config.trajectory_names:
        with StageRun(store, sid, name, "refine", keys.key("refine", name), run_id, report) as run:
            if run.skip:
                continue
            require_done(store, sid, "warp", keys.key("warp", name), name)
            base = f"trajectories/{name}/warp"
            mask = torch.from_numpy(store.read_array(sid, f"{base}/mask"))
            if config.mask.refine:
                depth = torch.from_numpy(store.read_array(sid, "depth/depth"))
                reliable = torch.from_numpy(store.read_array(sid, "depth/reliable"))
                K = torch.from_numpy(store.read_array(sid, "input/K"))
                cams = read_cameras(store, sid, name, config)
                warp = WarpResult(
                    to_signed(from_uint8(torch.from_numpy(store.read_array(sid, f"{base}/rgb")))),
                    torch.from_numpy(store.read_array(sid, f"{base}/depth")), mask)
                points = unproject_depth(depth, K, IDENTITY)
                mask = refine_mask_conservative(warp, points, ~reliable, cams.w2c, cams.K,
                                                threshold=config.mask.threshold,
                                                factor=mesh_downsample(config)).mask
            data = mask.numpy()
            store.write_array(sid, f"trajectories/{name}/refine/mask", data, chunks=_frame_chunks(data))
    return report


# 7. Video generation (teacher frames) -------------------------------------------------------------------------


def make_generator(config: RunConfig, scene: SceneRecord):
    if config.generator.backend == "oracle":
        return OracleGenerator(make_scene(scene.seed, kind=config.scenes.scene_kind))
    return WarpOnlyGenerator()


@task(name="generate")
def generate_video(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    store, keys, sid = RunStore(store_url), plan_keys(config, scene), scene.scene_id
    report = StageReport(sid, "generate", trajectories=config.trajectory_names)
    generator = make_generator(config, scene)
    for name in config.trajectory_names:
        with StageRun(store, sid, name, "generate", keys.key("generate", name), run_id, report) as run:
            if run.skip:
                continue
            require_done(store, sid, "refine", keys.key("refine", name), name)
            first = from_uint8(torch.from_numpy(store.read_array(sid, "input/rgb")))
            mask = torch.from_numpy(store.read_array(sid, f"trajectories/{name}/refine/mask"))
            warped = to_signed(from_uint8(torch.from_numpy(store.read_array(sid, f"trajectories/{name}/warp/rgb"))))
            warped = torch.where(mask, warped, torch.full_like(warped, -1.0))
            cams = read_cameras(store, sid, name, config)
            frames = generator.generate(first, scene.text, cams, warped, mask,
                                        seed=derive_seed(scene.seed, "generate", name))
            data = to_uint8(frames).numpy()
            store.write_array(sid, f"trajectories/{name}/teacher/rgb", data, chunks=_frame_chunks(data),
                              attrs={"generator": generator.name})
    return report


SCENE_TASKS = {"input": make_input, "depth": estimate_depth, "cameras": make_cameras, "warp": warp_frames,
               "refine": refine_masks, "generate": generate_video}
