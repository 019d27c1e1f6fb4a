"""What a run will do, without Prefect: its scene list, the run-wide checks made before any work, each
trajectory's cameras. The flow's tasks and the CLI's no-op check (``lyra run`` on a finished store) share these.
The scene list is built without importing torch (procedural scenes from :mod:`lyra_ops.scene_params`), so
``lyra run`` on a finished batch answers in about a second.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lyra_ops.errors import LyraConfigError, LyraInputError
from lyra_ops.prompts import SceneRecord, compose_prompts, procedural_scene_id, sample_records, text_scene_id
from lyra_ops.scene_params import sample_scene
from lyra_ops.seeding import derive_seed, numpy_rng
from lyra_pipeline.config import RunConfig

if TYPE_CHECKING:
    import torch

    from lyra_ops.cameras import Cameras


def check_models(config: RunConfig) -> None:
    """The depth and video model folders a config names, checked before anything is written (one line naming the
    folder and what is missing)."""
    if config.depth.backend == "transformers":
        from lyra_pipeline.backends.transformers_depth import inspect_depth_checkpoint

        inspect_depth_checkpoint(config.depth.model_path)
    if config.generator.backend == "diffusers":
        from lyra_pipeline.backends.diffusers_video import check_frame_format, inspect_checkpoint

        info = inspect_checkpoint(config.generator.model_path, config.generator.conditioned_path)
        check_frame_format(info, config.video.num_frames, config.video.height, config.video.width)
    if config.generator.backend == "tiny":
        from lyra_pipeline.backends.tiny_teacher import SHIPPED_TEACHER, inspect_teacher

        inspect_teacher(config.generator.model_path or SHIPPED_TEACHER)


def preflight(config: RunConfig) -> list[SceneRecord] | None:
    """Check run-wide inputs before any work starts (a bad custom trajectory would fail every scene, a bad
    checkpoint folder every generation, a broken image its scene ~45 s in). Returns the image folder's records
    (source ``images``), else None."""
    if config.scenes.source == "text":
        from lyra_pipeline.backends.diffusers_image import inspect_t2i_checkpoint

        inspect_t2i_checkpoint(config.text_to_image.model_path)
        if config.scenes.prompts_file:
            read_prompts_file(config.scenes.prompts_file)
    check_models(config)
    if config.trajectories.custom:
        cams, _ = trajectory_cameras(config, None, "custom", None)  # raises LyraInputError naming file/field/frame
        clip = config.video.num_frames
        if len(cams) > clip and config.latents.encoder == "vae":
            raise LyraConfigError(
                f"{config.trajectories.custom}: trajectories.frames={config.trajectories.frames!r} gives {len(cams)} "
                f"frames per path, generated clip by clip in {clip}-frame clips, whose sampled latents do not form "
                "one video: use latents.encoder patchify for long paths, or trajectories.frames clip (its first "
                f"{clip} frames)"
            )
    if config.scenes.source == "video":  # every check of the video and its poses, before anything is written
        from lyra_pipeline.video_input import load_input_video

        v = config.video
        load_input_video(config.scenes.video_path, config.scenes.poses_path, height=v.height, width=v.width,
                         num_frames=v.num_frames)
    if config.scenes.source == "images":
        from lyra_pipeline.inputs import check_images, scan_image_folder

        bank = scan_image_folder(config.scenes.images_dir, config.seed, warn=False)  # the run's own scan warns
        # every selected image decoded (>= 8x8) now: a broken file is named before a store or Prefect starts
        check_images(sample_records(bank, config.scenes.num_scenes, config.seed), config.video.height,
                     config.video.width)
        return bank
    return None


def plan_scenes(config: RunConfig, log=None) -> list[SceneRecord]:
    """A run's scene list after its run-wide checks (:func:`preflight`: a bad custom trajectory, image folder,
    video or checkpoint fails before any work); an image folder is scanned once, and ``log`` gets one line
    naming the images used."""
    bank = preflight(config)
    if config.trajectories.custom and log is not None:
        log(custom_path_plan(config))
    if bank is None:
        return scene_records(config)
    records = sample_records(bank, config.scenes.num_scenes, config.seed)
    if log is not None:
        used = [r.scene_id for r in records]
        log(f"images: {len(used)} of {len(bank)} in {config.scenes.images_dir}: {', '.join(used)}")
    return records


def procedural_records(config: RunConfig) -> list[SceneRecord]:
    records = []
    for i in range(config.scenes.num_scenes):
        scene_id = procedural_scene_id(i)
        seed = derive_seed(config.seed, scene_id)
        scene = sample_scene(seed, kind=config.scenes.scene_kind)
        sha = hashlib.sha256(json.dumps(scene.describe(), sort_keys=True).encode()).hexdigest()
        records.append(SceneRecord(scene_id, scene.prompt, None, sha, seed, "procedural"))
    return records


def read_prompts_file(path: str) -> list[str]:
    """Prompts of a text file: one per line; blank lines and '#' comments skipped; duplicates dropped."""
    p = Path(path)
    if not p.is_file():
        raise LyraInputError(f"{p}: prompts file not found (scenes.prompts_file: one prompt per line)")
    seen, out = set(), []
    for line in p.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith("#") and text not in seen:
            seen.add(text)
            out.append(text)
    if not out:
        raise LyraInputError(f"{p}: no prompts (one per line expected)")
    return out


def text_records(config: RunConfig) -> list[SceneRecord]:
    """Text-only scenes: the prompts file's rows, or seeded template prompts (scene type x style x lighting)."""
    s = config.scenes
    prompts = read_prompts_file(s.prompts_file) if s.prompts_file else compose_prompts(s.num_scenes, config.seed)
    records = []
    for i, text in enumerate(prompts):
        sid = text_scene_id(i)
        records.append(SceneRecord(sid, text, None, hashlib.sha256(text.encode()).hexdigest(),
                                   derive_seed(config.seed, sid), "text"))
    return records


def video_record(config: RunConfig) -> SceneRecord:
    """The one scene of a user video: id from the file name, prompt from ``NAME.txt`` beside it (else empty),
    identity = sha256 of the video and poses files."""
    import re

    video, poses = Path(config.scenes.video_path), Path(config.scenes.poses_path)
    for p, what in ((video, "scenes.video_path"), (poses, "scenes.poses_path")):
        if not p.is_file():
            raise LyraInputError(f"{p}: no such file ({what})")
    sha = hashlib.sha256(video.read_bytes() + b"\0" + poses.read_bytes()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", video.stem).lstrip("._-") or "video"
    prompt_file = video.with_suffix(".txt")
    text = prompt_file.read_text(encoding="utf-8").strip() if prompt_file.is_file() else ""
    return SceneRecord(stem, text, str(video.resolve()), sha, derive_seed(config.seed, stem), "video")


def dynamic_records(config: RunConfig) -> list[SceneRecord]:
    """Dynamic procedural scenes ``dyn-NNNNNN``: the room of a seed with ``dynamic.moving`` objects in motion."""
    from lyra_ops.motions import describe_dynamic, dynamic_prompt, sample_motions

    records = []
    for i in range(config.scenes.num_scenes):
        scene_id = f"dyn-{i:06d}"
        seed = derive_seed(config.seed, scene_id)
        params = sample_scene(seed, kind=config.scenes.scene_kind)
        motions = sample_motions(params, config.dynamic.moving)
        sha = hashlib.sha256(json.dumps(describe_dynamic(params, motions), sort_keys=True).encode()).hexdigest()
        records.append(SceneRecord(scene_id, dynamic_prompt(params, motions), None, sha, seed, "dynamic"))
    return records


def scene_records(config: RunConfig) -> list[SceneRecord]:
    """The run's scene list: seeded and order-independent (procedural, dynamic, text prompts or an image
    folder)."""
    if config.scenes.source == "procedural":
        return procedural_records(config)
    if config.scenes.source == "dynamic":
        return dynamic_records(config)
    if config.scenes.source == "video":
        return [video_record(config)]
    if config.scenes.source == "text":
        return sample_records(text_records(config), config.scenes.num_scenes, config.seed)
    from lyra_pipeline.inputs import scan_image_folder

    bank = scan_image_folder(config.scenes.images_dir, config.seed)
    return sample_records(bank, config.scenes.num_scenes, config.seed)


_LOGGED_FRAME_CHOICES: set[tuple[str, str]] = set()
# Rough SDG seconds per stored frame of a custom path at 96x160 on one CPU thread, all stages (scaled by the pixel
# count): oracle / warp_only measured on the 500-frame Lyra-2 path (tests/test_custom_paths.py, slow), tiny from
# benchmarks/results/long_path_cpu.json (4 shared frames per clip). Diffusers teachers depend on the checkpoint.
ROUGH_S_PER_FRAME = {"oracle": 0.1, "warp_only": 0.1, "tiny": 0.28}


def _log_frame_choice(path: str, total: int, frames: str | int, picks: list[int], held: int) -> None:
    """Warn once per process when a custom path's frames are dropped (trajectories.frames clip, N or stride)."""
    import logging

    kept = len(set(picks))
    if kept == total or (path, str(frames)) in _LOGGED_FRAME_CHOICES:
        return
    _LOGGED_FRAME_CHOICES.add((path, str(frames)))
    what = f"uses {kept} of its {total} frames (trajectories.frames: {frames})"
    if held:
        what += f", then holds the last pose for {held} frames to reach {len(picks)} (8k+1)"
    logging.getLogger("lyra_pipeline.planning").warning("%s: the custom path %s; trajectories.frames: all keeps "
                                                        "every frame", path, what)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def custom_path_plan(config: RunConfig) -> str:
    """One line: how many frames of the custom path each scene stores (and how many hold the last pose), how the
    teacher generates them (whole, or in how many clips) and roughly how long that takes per scene on a CPU."""
    from lyra_pipeline.long_paths import clip_starts

    t, v, g = config.trajectories, config.video, config.generator
    whole, picks, held = _custom_frames(config)
    total, stored, kept = len(whole), len(picks), len(set(picks))
    used = f"all {total}" if kept == total else f"{kept} of its {total}"
    line = f"{t.custom}: custom path, {used} frames (trajectories.frames: {t.frames})"
    if held:
        line += f" + {held} holding the last pose = {stored} (8k+1)"
    line += f" per scene at {v.height}x{v.width}"
    if g.backend in ("oracle", "warp_only") or stored <= v.num_frames:
        line += f", generated whole by the {g.backend} teacher"
    else:
        clips = len(clip_starts(stored, v.num_frames, g.clip_overlap))
        line += (f", generated by the {g.backend} teacher in {clips} clips of {v.num_frames} frames sharing "
                 f"{g.clip_overlap} (generator.clip_overlap)")
    rate = ROUGH_S_PER_FRAME.get(g.backend)
    if rate is not None and g.device == "cpu":
        seconds = rate * stored * v.height * v.width / (96 * 160)
        n = config.scenes.num_scenes
        total = f" ({_duration(seconds * n)} for {n} scenes)" if n > 1 else ""
        line += f"; roughly {_duration(seconds)} per scene{total} on one CPU thread"
    return line


def _custom_frames(config: RunConfig) -> tuple[Cameras, list[int], int]:
    """(every camera of the custom path file, the indices stored (held ones included), how many hold the last
    pose)."""
    from lyra_ops.trajectories import load_trajectory, select_frames

    v, t = config.video, config.trajectories
    whole = load_trajectory(t.custom, height=v.height, width=v.width, pose_scale=t.pose_scale)
    if len(whole) < 2:  # as the built-in paths: a camera path moves (one pose would be a still "trajectory")
        raise LyraInputError(f"{t.custom}: the path has {len(whole)} frame; trajectories.custom expects a camera "
                             "path of at least 2 frames (one pose per frame)")
    try:
        picks, held = select_frames(len(whole), t.frames, v.num_frames)
    except LyraInputError as exc:
        raise LyraInputError(f"{t.custom}: {exc}") from None
    return whole, picks, held


def input_intrinsics(config: RunConfig) -> torch.Tensor:
    """The input frame's camera (3,3): a custom path's frame-0 intrinsics (mapped to the video size like the image
    is, so the input and the path share one camera), else the configured field of view."""
    from lyra_ops.cameras import default_intrinsics

    v = config.video
    if config.trajectories.custom:
        return trajectory_cameras(config, None, "custom", None)[0].K[0].clone()
    return default_intrinsics(v.height, v.width, v.hfov_deg)


def trajectory_cameras(config: RunConfig, scene: SceneRecord | None, name: str,
                       K: torch.Tensor | None) -> tuple[Cameras, float]:
    from lyra_ops.trajectories import ALL_PATHS, draw_distance, make_trajectory

    v, t = config.video, config.trajectories
    if name == "custom":
        import torch

        whole, picks, held = _custom_frames(config)
        _log_frame_choice(t.custom, len(whole), t.frames, picks, held)
        return whole[torch.tensor(picks)], 0.0
    distance = draw_distance(ALL_PATHS[name], numpy_rng(scene.seed, "trajectory", name), t.distance_factor)
    cams = make_trajectory(name, K, v.height, v.width, v.num_frames, distance=distance,
                           center_depth=t.center_depth, lookat=t.lookat)
    return cams, distance


# --- dynamic scenes ----------------------------------------------------------------------------------------


def dynamic_world(config: RunConfig, scene: SceneRecord):
    """The moving procedural scene behind a ``dynamic`` record (its exact ground truth at any camera and time)."""
    from lyra_ops.dynamic import make_dynamic_scene

    return make_dynamic_scene(scene.seed, moving=config.dynamic.moving)


def dynamic_input(config: RunConfig, scene: SceneRecord) -> tuple[torch.Tensor, Cameras, torch.Tensor]:
    """A dynamic scene's input video: frames (T,3,H,W) in [0,1], its cameras (frame 0 at the identity) and the
    frames' normalised times (T,). A user video is read and validated (``lyra_pipeline.video_input``)."""
    from lyra_ops.dynamic import frame_times, input_camera_path

    v = config.video
    if scene.source == "video":
        from lyra_pipeline.video_input import load_input_video

        clip = load_input_video(config.scenes.video_path, config.scenes.poses_path, height=v.height, width=v.width,
                                num_frames=v.num_frames)
        return clip.frames, clip.cameras, clip.times
    cams = input_camera_path(scene.seed, input_intrinsics(config), v.height, v.width, v.num_frames,
                             speed=config.dynamic.camera_speed)
    times = frame_times(v.num_frames)
    frames = dynamic_world(config, scene).render(cams.c2w, cams.K, v.height, v.width, times).rgb
    return frames, cams, times


def dynamic_trajectory(config: RunConfig, scene: SceneRecord, name: str, input_cameras: Cameras):
    """Novel path ``name`` of a dynamic scene (``<path>_flip``: its flipped twin, the same distance) as a
    :class:`lyra_ops.dynamic.DynamicPath`, and the path's distance."""
    from lyra_ops.dynamic import dynamic_path
    from lyra_ops.trajectories import ALL_PATHS, draw_distance
    from lyra_pipeline.config import FLIP_SUFFIX

    t = config.trajectories
    base = name.removesuffix(FLIP_SUFFIX)
    distance = draw_distance(ALL_PATHS[base], numpy_rng(scene.seed, "trajectory", base), t.distance_factor)
    path = dynamic_path(base, input_cameras, distance=distance, center_depth=t.center_depth, lookat=t.lookat,
                        flipped=name.endswith(FLIP_SUFFIX))
    return path, distance
