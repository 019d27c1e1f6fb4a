"""Prefect tasks of synthetic data generation: one task run = one stage of one scene (all its trajectories).

Each task: plan its key, skip if done, read its inputs from the store, call ``lyra_ops``, write, and return a
small ``StageReport``. ``lyra stage NAME`` calls the same functions through ``.fn`` without Prefect.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from prefect import task

from lyra_ops.cameras import Cameras
from lyra_ops.depth import align_depth_scale, postprocess_depth
from lyra_ops.generation import OracleGenerator, WarpOnlyGenerator
from lyra_ops.images import from_signed, from_uint8, to_signed, to_uint8
from lyra_ops.latents import PixelPatchifyEncoder
from lyra_ops.mask_refine import refine_mask_conservative
from lyra_ops.prompts import SceneRecord
from lyra_ops.scenes import make_scene
from lyra_ops.seeding import derive_seed
from lyra_ops.warp import WarpResult, depth_reliability_mask, forward_warp, unproject_depth
from lyra_pipeline import dynamic_stages as dynamic
from lyra_pipeline.backends import depth_estimator
from lyra_pipeline.config import DYNAMIC_SOURCES, RunConfig, edge_threshold, mesh_downsample
from lyra_pipeline.inputs import load_depth_file, load_image
from lyra_pipeline.long_paths import generate_long_path
from lyra_pipeline.planning import input_intrinsics, scene_records, trajectory_cameras
from lyra_pipeline.retries import STAGE_TASK_OPTIONS
from lyra_pipeline.stages import StageReport, plan_keys, run_units
from lyra_pipeline.store.dataset import bind, record_dataset
from lyra_pipeline.store.runstore import RunStore, store_exists

log = logging.getLogger(__name__)
IDENTITY = torch.eye(4)


# 1. Prompt sampling ---------------------------------------------------------------------------------------


@task(name="sample-prompts", **STAGE_TASK_OPTIONS)
def sample_prompts(store_url: str, config: RunConfig, preset: str | None = None, overrides: dict | None = None,
                   records: list[SceneRecord] | None = None) -> list[SceneRecord]:
    """The scene list, recorded as ``prompts.parquet`` (rewritten only if it changed). With ``preset``: the
    dataset ``preset`` + ``overrides`` must give the store's scene list (or add to it), checked before anything
    is written, and is recorded beside it (``dataset.json``; :mod:`lyra_pipeline.store.dataset`); ``records``:
    that list when the caller already bound it (the flow), so the inputs are not read again."""
    if preset is None:  # a store of its own (``reconstruct``'s): its one scene is whatever the config says
        records = scene_records(config)
        RunStore(store_url).write_prompts([r.as_row() for r in records])
        return records
    if records is None:
        existing = RunStore(store_url) if store_exists(store_url) else None
        binding = bind(existing, preset, overrides or {}, command="run")
        preset, overrides, records = binding.preset, binding.overrides, binding.records
    record_dataset(RunStore(store_url), preset, overrides or {}, records)
    return records


# 2. First frame -----------------------------------------------------------------------------------------------


def read_tensor(store: RunStore, scene_id: str, name: str) -> torch.Tensor:
    return torch.from_numpy(store.read_array(scene_id, name))


def make_text_to_image(config: RunConfig):
    from lyra_pipeline.backends.diffusers_image import TextToImage

    t = config.text_to_image
    return TextToImage(t.model_path, steps=t.steps, guidance=t.guidance, dtype=t.dtype, device=t.device,
                       max_text_tokens=t.max_text_tokens)


@task(name="input", **STAGE_TASK_OPTIONS)
def make_input(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    v, sid = config.video, scene.scene_id

    def compute(store: RunStore, _: str) -> None:
        if scene.source in DYNAMIC_SOURCES:
            return dynamic.make_input(store, config, scene)
        K = input_intrinsics(config)
        if scene.source == "procedural":
            procedural = make_scene(scene.seed, kind=config.scenes.scene_kind)
            rgb = procedural.render(IDENTITY[None], K[None], v.height, v.width).rgb[0]
        elif scene.source == "text":
            rgb = make_text_to_image(config).generate(scene.text, v.height, v.width,
                                                      seed=derive_seed(scene.seed, "text-to-image"))
        else:
            rgb = load_image(scene.image_path, v.height, v.width, expected_sha=scene.content_sha)
        store.scene_group(sid).attrs.update(scene.as_row())
        store.write_array(sid, "input/rgb", to_uint8(rgb).numpy())
        store.write_array(sid, "input/K", K.numpy())

    return run_units(store_url, config, scene, "input", run_id, compute)


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
    pred = depth_estimator(d).estimate(rgb, K)
    return pred.depth, pred.valid, pred.label


@task(name="depth", **STAGE_TASK_OPTIONS)
def estimate_depth(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    sid = scene.scene_id

    def compute(store: RunStore, _: str) -> None:
        if scene.source in DYNAMIC_SOURCES:
            return dynamic.estimate_depth(store, config, scene)
        rgb = from_uint8(read_tensor(store, sid, "input/rgb"))
        raw, valid, label = _estimate_depth(config, scene, rgb, read_tensor(store, sid, "input/K"))
        depth = postprocess_depth(raw, valid, config.depth.max_depth)
        reliable = depth_reliability_mask(depth, config.depth.edge_window, edge_threshold(config))
        store.write_array(sid, "depth/depth", depth.numpy(), attrs={"label": label})
        store.write_array(sid, "depth/reliable", reliable.numpy())

    return run_units(store_url, config, scene, "depth", run_id, compute)


# 4. Camera trajectories ---------------------------------------------------------------------------------------


@task(name="cameras", **STAGE_TASK_OPTIONS)
def make_cameras(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    sid = scene.scene_id

    def compute(store: RunStore, name: str) -> None:
        if scene.source in DYNAMIC_SOURCES:
            return dynamic.make_cameras(store, config, scene, name)
        cams, distance = trajectory_cameras(config, scene, name, read_tensor(store, sid, "input/K"))
        base = f"trajectories/{name}/cameras"
        store.write_array(sid, f"{base}/c2w", cams.c2w.numpy(), attrs={"distance": distance})
        store.write_array(sid, f"{base}/K", cams.K.numpy())

    return run_units(store_url, config, scene, "cameras", run_id, compute)


def read_cameras(store: RunStore, scene_id: str, name: str, config: RunConfig) -> Cameras:
    base = f"trajectories/{name}/cameras"
    return Cameras(read_tensor(store, scene_id, f"{base}/c2w"), read_tensor(store, scene_id, f"{base}/K"),
                   config.video.height, config.video.width)


def write_frames(store: RunStore, scene_id: str, name: str, data: np.ndarray, **attrs) -> None:
    """A (T, ...) per-frame array, one chunk per frame."""
    store.write_array(scene_id, name, data, chunks=(1, *data.shape[1:]), attrs=attrs or None)


# 5. Forward warping -------------------------------------------------------------------------------------------


@task(name="warp", **STAGE_TASK_OPTIONS)
def warp_frames(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    sid = scene.scene_id

    def compute(store: RunStore, name: str) -> None:
        if scene.source in DYNAMIC_SOURCES:
            return dynamic.warp_frames(store, config, scene, name)
        rgb = to_signed(from_uint8(read_tensor(store, sid, "input/rgb")))
        cams = read_cameras(store, sid, name, config)
        warp = forward_warp(rgb, read_tensor(store, sid, "depth/depth"), read_tensor(store, sid, "input/K"),
                            IDENTITY, cams.K, cams.w2c, source_mask=read_tensor(store, sid, "depth/reliable"),
                            depth_weight_scale=config.warp.depth_weight_scale)
        base = f"trajectories/{name}/warp"
        write_frames(store, sid, f"{base}/rgb", to_uint8(from_signed(warp.rgb)).numpy())
        write_frames(store, sid, f"{base}/depth", warp.depth.numpy())
        write_frames(store, sid, f"{base}/mask", warp.mask.numpy())

    return run_units(store_url, config, scene, "warp", run_id, compute)


# 6. Conservative mask refinement ------------------------------------------------------------------------------


@task(name="refine", **STAGE_TASK_OPTIONS)
def refine_masks(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    sid = scene.scene_id

    def compute(store: RunStore, name: str) -> None:
        if scene.source in DYNAMIC_SOURCES:
            return dynamic.refine_masks(store, config, scene, name)
        base = f"trajectories/{name}/warp"
        mask = read_tensor(store, sid, f"{base}/mask")
        if config.mask.refine:
            reliable = read_tensor(store, sid, "depth/reliable")
            cams = read_cameras(store, sid, name, config)
            warp = WarpResult(to_signed(from_uint8(read_tensor(store, sid, f"{base}/rgb"))),
                              read_tensor(store, sid, f"{base}/depth"), mask)
            points = unproject_depth(read_tensor(store, sid, "depth/depth"), read_tensor(store, sid, "input/K"),
                                     IDENTITY)
            mask = refine_mask_conservative(warp, points, ~reliable, cams.w2c, cams.K,
                                            threshold=config.mask.threshold, factor=mesh_downsample(config)).mask
        write_frames(store, sid, f"trajectories/{name}/refine/mask", mask.numpy())

    return run_units(store_url, config, scene, "refine", run_id, compute)


# 7. Video generation (teacher frames) -------------------------------------------------------------------------


def make_generator(config: RunConfig, scene: SceneRecord, store: RunStore | None = None):
    g = config.generator
    if g.backend == "oracle":
        return OracleGenerator(make_scene(scene.seed, kind=config.scenes.scene_kind))
    if g.backend == "diffusers":
        from lyra_pipeline.backends.diffusers_video import DEFAULT_NEGATIVE_PROMPT, DiffusersVideoGenerator

        return DiffusersVideoGenerator(
            g.model_path, conditioned_path=g.conditioned_path, dtype=g.dtype, device=g.device, steps=g.steps,
            guidance=g.guidance, negative_prompt=g.negative_prompt or DEFAULT_NEGATIVE_PROMPT,
            max_text_tokens=g.max_text_tokens, cpu_offload=g.cpu_offload, vae_tiling=g.vae_tiling,
            vae_slicing=g.vae_slicing, text_cache=store.text_cache() if store is not None else None,
        )  # fmt: skip
    if g.backend == "tiny":
        from lyra_pipeline.backends.tiny_teacher import TinyTeacherGenerator

        return TinyTeacherGenerator(g.model_path, steps=g.steps if "steps" in g.model_fields_set else None,
                                    device=g.device)
    return WarpOnlyGenerator()


@task(name="generate", **STAGE_TASK_OPTIONS)
def generate_video(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    sid, generator = scene.scene_id, make_generator(config, scene, RunStore(store_url))

    def compute(store: RunStore, name: str) -> None:
        if scene.source in DYNAMIC_SOURCES:
            return dynamic.generate_video(store, config, scene, name, generator)
        base = f"trajectories/{name}"
        first = from_uint8(read_tensor(store, sid, "input/rgb"))
        cams = read_cameras(store, sid, name, config)
        if len(cams) > config.video.num_frames and config.generator.backend in ("tiny", "diffusers"):
            return generate_long_path(store, config, scene, name, generator, plan_keys(config, scene).key(
                "generate", name), cams, first, read_tensor(store, sid, "depth/depth"),
                read_tensor(store, sid, "depth/reliable"), read_tensor(store, sid, "input/K"))  # clip by clip
        mask = read_tensor(store, sid, f"{base}/refine/mask")
        warped = to_signed(from_uint8(read_tensor(store, sid, f"{base}/warp/rgb")))
        warped = torch.where(mask, warped, torch.full_like(warped, -1.0))
        seed = derive_seed(scene.seed, "generate", name)
        if hasattr(generator, "generate_with_latents"):  # diffusion backends: keep the sampled latents too
            frames, latents = generator.generate_with_latents(first, scene.text, cams, warped, mask, seed=seed)
            store.write_array(sid, f"{base}/teacher/latents", latents.float().numpy(),
                              chunks=(latents.shape[0], 1, *latents.shape[2:]),
                              attrs={"encoder": generator.encoder_id})
        else:
            frames = generator.generate(first, scene.text, cams, warped, mask, seed=seed)
        write_frames(store, sid, f"{base}/teacher/rgb", to_uint8(frames).numpy(), generator=generator.name)

    return run_units(store_url, config, scene, "generate", run_id, compute)


# 8. Latents of the teacher video (the decoder's input) ---------------------------------------------------------


def make_latent_encoder(config: RunConfig) -> PixelPatchifyEncoder:
    return PixelPatchifyEncoder()


@task(name="latents", **STAGE_TASK_OPTIONS)
def encode_latents(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    sid, encoder = scene.scene_id, make_latent_encoder(config)

    def compute(store: RunStore, name: str) -> None:
        base = f"trajectories/{name}"
        if config.latents.encoder == "vae":  # the generator's own sampled latents (the decoded frames' source)
            arr = store.scene_group(sid)[f"{base}/teacher/latents"]
            latents, name_attr = np.asarray(arr[...]).astype(config.latents.dtype), arr.attrs["encoder"]
        else:
            frames = to_signed(from_uint8(read_tensor(store, sid, f"{base}/teacher/rgb")))
            latents = encoder.encode(frames).to(getattr(torch, config.latents.dtype)).numpy()  # (C, T_l, h, w)
            name_attr = encoder.name
        store.write_array(sid, f"{base}/latents", latents, chunks=(latents.shape[0], 1, *latents.shape[2:]),
                          attrs={"encoder": name_attr})

    return run_units(store_url, config, scene, "latents", run_id, compute)


# 9. Depth of every teacher frame (Lyra: ViPE on the generated videos): the decoder's depth supervision -------


def teacher_frame_depth(config: RunConfig, scene: SceneRecord, frames: torch.Tensor, cams: Cameras,
                        warped: torch.Tensor, warped_valid: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Metric z-depth (T,1,H,W) of the teacher frames (0: unknown) and its label.

    ``procedural``: the exact depth of the scene at each frame's camera. ``transformers``: the depth model on
    each frame, scaled per frame into the cameras' metric frame by the median ratio to the warped input depth
    (``warped`` where ``warped_valid``). Other backends have no per-frame estimator: the warped input depth where
    the refined mask trusts it, unknown elsewhere."""
    d = config.depth
    if d.backend == "procedural":
        world = make_scene(scene.seed, kind=config.scenes.scene_kind)
        return world.render(cams.c2w, cams.K, cams.height, cams.width).depth.float(), "procedural (exact)"
    if d.backend == "transformers":
        estimator = depth_estimator(d)
        out = []
        for i in range(frames.shape[0]):
            pred = estimator.estimate(frames[i], cams.K[i])
            depth = torch.where(pred.valid, pred.depth, 0.0) if pred.valid is not None else pred.depth
            out.append(align_depth_scale(depth, warped[i, 0], warped_valid[i, 0])[0])
        return torch.stack(out)[:, None].float(), f"{pred.label}, scaled to the warped input depth per frame"
    return torch.where(warped_valid, warped, 0.0).float(), "warped input depth (refined mask; elsewhere unknown)"


@task(name="video_depth", **STAGE_TASK_OPTIONS)
def estimate_video_depth(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> StageReport:
    sid = scene.scene_id

    def compute(store: RunStore, name: str) -> None:
        base = f"trajectories/{name}"
        if scene.source in DYNAMIC_SOURCES:
            depth, label = dynamic.video_depth(store, config, scene, name)
            return write_frames(store, sid, f"{base}/video_depth/depth", depth.numpy(), label=label)
        frames = from_uint8(read_tensor(store, sid, f"{base}/teacher/rgb"))
        warped = read_tensor(store, sid, f"{base}/warp/depth").float()
        valid = read_tensor(store, sid, f"{base}/refine/mask").bool() & (warped > 0)
        depth, label = teacher_frame_depth(config, scene, frames, read_cameras(store, sid, name, config), warped,
                                           valid)
        write_frames(store, sid, f"{base}/video_depth/depth", depth.numpy(), label=label)

    return run_units(store_url, config, scene, "video_depth", run_id, compute)


SCENE_TASKS = {"input": make_input, "depth": estimate_depth, "cameras": make_cameras, "warp": warp_frames,
               "refine": refine_masks, "generate": generate_video, "latents": encode_latents,
               "video_depth": estimate_video_depth}


@task(name="scene", **STAGE_TASK_OPTIONS)
def process_scene(store_url: str, config: RunConfig, scene: SceneRecord, run_id: str = "") -> list[StageReport]:
    """Every SDG stage of one scene in DAG order, in one task (``compute.tasks: scene``). A retry or a re-run
    skips the units already done, exactly as the per-stage tasks do."""
    return [stage.fn(store_url, config, scene, run_id) for stage in SCENE_TASKS.values()]
